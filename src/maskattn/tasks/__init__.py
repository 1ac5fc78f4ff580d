"""Ready-to-train tasks: each wires data, a model, the trainer and metrics together.

Each task is one module that registers a :class:`~maskattn.tasks.base.Task` (see ``tasks/base.py``);
the command line is built from that registry.
"""

# The built-in tasks, in the order the CLI lists them: each is the module maskattn.tasks.NAME, which
# registers the task NAME when imported. A new task adds its name here.
BUILTIN = ("translation", "classification", "qa", "lm", "caption")
