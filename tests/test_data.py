import gzip
import json
import re
from pathlib import Path

import pytest
import torch

from maskattn import data, masks
from maskattn.data import DataError, read_labelled, read_parallel

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared datasets not found at {SHARED}")


@needs_shared
def test_real_files():
    pairs = data.read_parallel(SHARED / "multi30k/val.de.gz", SHARED / "multi30k/val.en.gz")
    assert len(pairs) == 1014 and all(a and b for a, b in pairs)
    sst = data.read_labelled(SHARED / "sst2/test.tsv")
    assert len(sst) == 872 and {label for _, label in sst} == {"0", "1"}
    squad = data.read_squad(SHARED / "squad/dev-v1.1.json")
    assert len(squad) == 795
    ex = squad[0]
    text, start = ex.answers[0]
    assert ex.context[start : start + len(text)] == text
    assert len(data.read_text(SHARED / "tinyshakespeare/input.txt")) == 1115394


def test_parallel_misaligned_and_tsv(tmp_path):
    src, tgt = tmp_path / "a.de.gz", tmp_path / "a.en"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("eins\nzwei\ndrei\n")
    tgt.write_text("one\ntwo\n")
    with pytest.raises(DataError, match=r"a.de.gz has 3 lines but .*a.en has 2"):
        data.read_parallel(src, tgt)
    tsv = tmp_path / "p.tsv"
    tsv.write_text("eins\tone\nzwei two\n")
    with pytest.raises(DataError, match=r"p.tsv:2: expected 'source<TAB>target'"):
        data.read_parallel(tsv)


def test_labelled_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "x.tsv"
    bad.write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match=r"x.tsv:1: no column 'sentence'"):
        data.read_labelled(bad)
    bad.write_text("sentence\tlabel\nfine\t1\nbroken\t\n")
    with pytest.raises(DataError, match=r"x.tsv:3: empty label"):
        data.read_labelled(bad)
    jl = tmp_path / "y.jsonl"
    jl.write_text('{"sentence": "ok", "label": "pos"}\n{"sentence": "no label"}\n')
    with pytest.raises(DataError, match=r"y.jsonl:2: expected an object"):
        data.read_labelled(jl)
    csv_file = tmp_path / "z.csv"
    csv_file.write_text('sentence,label\n"a, quoted, text",neg\n')
    assert data.read_labelled(csv_file) == [("a, quoted, text", "neg")]


def test_squad_span_not_in_context(tmp_path):
    doc = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "The cat sat.", "qas": [
            {"id": "q1", "question": "Who?", "answers": [{"text": "cat", "answer_start": 4}]},
            {"id": "q2", "question": "What?", "answers": [{"text": "dog", "answer_start": 4}]}]}]}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc, indent=1))
    with pytest.raises(DataError, match=r"s.json:\d+: data\[0\]\.paragraphs\[0\]\.qas\[1\] \(question 'q2'\), "
                       r"answers\[0\]: field 'answer_start': answer 'dog' is not at character 4"):
        data.read_squad(path)


def test_bucket_batches_are_deterministic_complete_and_bounded():
    lengths = [((i * 37) % 50) + 1 for i in range(500)]
    a = data.bucket_batches(lengths, 200, seed=1, epoch=0)
    assert a == data.bucket_batches(lengths, 200, seed=1, epoch=0)
    assert a != data.bucket_batches(lengths, 200, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(500))
    assert all(max(lengths[i] for i in b) * len(b) <= 200 for b in a)


def test_random_batches_are_deterministic_complete_and_cut_by_size():
    a = data.random_batches(10, 4, seed=1, epoch=0)
    assert a == data.random_batches(10, 4, seed=1, epoch=0) != data.random_batches(10, 4, seed=1, epoch=1)
    assert [len(b) for b in a] == [4, 4, 2] and sorted(i for b in a for i in b) == list(range(10))
    assert data.random_batches(10, 4, seed=1, epoch=0, drop_last=True) == a[:2]
    assert data.random_batches(3, 4, seed=0, epoch=0, drop_last=True) == []


def test_pack_gives_document_ids_for_document_masks():
    ids, docs = data.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block=4)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert docs.tolist() == [[0, 0, 0, 1], [1, 2, 2, 2]]
    dense = (masks.document(docs) & masks.causal()).to_dense(4, 4)
    assert dense[1, 0].tolist() == [[True, False, False, False], [False, True, False, False],
                                    [False, True, True, False], [False, True, True, True]]


def test_pad_right_pads_with_the_pad_id_and_reports_lengths():
    ids, lengths = data.pad([[5, 6, 7], [8], []], pad_id=9)
    assert ids.dtype == torch.long and ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]]
    assert lengths.tolist() == [3, 1, 0]
    ids, lengths = data.pad([], pad_id=9)
    assert ids.shape == (0, 0) and lengths.tolist() == []


def test_shard_deals_every_batch_between_ranks():
    batches = [[0, 1, 2, 3], [4], [5, 6]]
    assert data.shard(batches, rank=0, world_size=2) == [[0, 2], [5]]
    assert data.shard(batches, rank=1, world_size=2) == [[1, 3], [6]]  # [4] has fewer items than ranks: dropped


def _squad_file(tmp_path, answers=None, **qa_fields):
    qa = {"id": "q1", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}]
          if answers is None else answers, **qa_fields}
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "Ann ran.", "qas": [qa]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("answers,qa_fields,field,says", [
    ([{"text": "ran.", "answer_start": -4}], {}, "answer_start", "not at character -4"),  # Python's -4 would match
    ([{"text": "Ann", "answer_start": "0"}], {}, "answer_start", "must be a JSON integer, got str"),
    ([{"text": "Ann", "answer_start": True}], {}, "answer_start", "must be a JSON integer, got bool"),
    ([{"answer_start": 0}], {}, "text", "is missing"),
    ([{"text": 3, "answer_start": 0}], {}, "text", "must be a JSON string, got int"),
    ([{"text": "", "answer_start": 0}], {}, "text", "an empty answer"),  # trained as "no answer here"
    ([{"text": " ", "answer_start": 3}], {}, "text", "an empty answer"),
    (["Ann"], {}, "answer", "must be a JSON object, got str"),
    (None, {"question": None}, "question", "must be a JSON string, got NoneType"),
    ({"text": "Ann"}, {}, "answers", "must be a JSON list, got dict"),
])
def test_malformed_squad_records_name_file_position_and_field(tmp_path, answers, qa_fields, field, says):
    """Issue 16 item 4: on main a negative answer_start passed as "no answer", a missing field raised a bare
    KeyError and wrong types raised Python-internal messages."""
    path = _squad_file(tmp_path, answers, **qa_fields)
    with pytest.raises(data.DataError) as info:
        data.read_squad(path)
    message = str(info.value)
    assert str(path) in message and "data[0].paragraphs[0].qas[0]" in message
    assert f"field {field!r}" in message and says in message


@pytest.mark.parametrize("doc,where,field", [
    ({"data": [{"paragraphs": [{"qas": []}]}]}, "data[0].paragraphs[0]", "context"),
    ({"data": [{"paragraphs": [{"context": "x", "qas": [{"question": "Who?"}]}]}]}, "qas[0]", "id"),
    ({"data": ["article"]}, "data[0]", "article"),
    ({"data": [{"paragraphs": [{"context": 5, "qas": []}]}]}, "data[0].paragraphs[0]", "context"),
])
def test_malformed_squad_structure_names_the_record(tmp_path, doc, where, field):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(data.DataError, match=rf"{re.escape(where)}.*field '{field}'"):
        data.read_squad(path)


def test_squad_without_answers_reads_but_cannot_be_scored(tmp_path):
    path = _squad_file(tmp_path, answers=[])
    assert data.read_squad(path)[0].answers == ()
    with pytest.raises(data.DataError, match=r"qas\[0\] \(question 'q1'\): field 'answers': no answer to score"):
        data.read_squad(path, require_answers=True)


def test_a_byte_order_mark_and_trailing_blank_lines_are_not_data(tmp_path):
    # Excel's CSV and Notepad's files start with a BOM: the header read '\ufeffsentence'; one blank last line
    # failed every reader but JSONL's
    (tmp_path / "a.csv").write_bytes("\ufeffsentence,label\ngood film,1\n\n\n".encode())
    assert read_labelled(tmp_path / "a.csv") == [("good film", "1")]
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nbad film\t0\n\n")
    assert read_labelled(tmp_path / "a.tsv") == [("bad film", "0")]
    (tmp_path / "p.tsv").write_bytes("\ufeffHallo Welt\tHello world\nzwei\ttwo\n\n".encode())
    assert read_parallel(tmp_path / "p.tsv") == [("Hallo Welt", "Hello world"), ("zwei", "two")]
    (tmp_path / "de.txt").write_text("eins\nzwei\n\n")
    (tmp_path / "en.txt").write_text("one\ntwo\n")
    assert read_parallel(tmp_path / "de.txt", tmp_path / "en.txt") == [("eins", "one"), ("zwei", "two")]
    (tmp_path / "gap.txt").write_text("eins\n\nzwei\n")  # a blank line inside aligned files is still an error
    (tmp_path / "three.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(DataError, match=r"gap\.txt:2: empty sentence"):
        read_parallel(tmp_path / "gap.txt", tmp_path / "three.txt")


def test_a_jsonl_text_that_is_not_a_string_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"sentence": null, "label": 1}\n')  # read as the text 'None'
    with pytest.raises(DataError, match=r"a\.jsonl:1: 'sentence' must be a string, got None"):
        read_labelled(tmp_path / "a.jsonl")


def test_a_squad_error_names_the_line_of_a_non_ascii_question_id(tmp_path):
    # the id was searched for in its \u-escaped form only: a file written with ensure_ascii=False said line 1
    doc = {"data": [{"title": "t", "paragraphs": [{"context": "Ann went home.", "qas": [
        {"id": "qü", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 999}]}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    line = next(n for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if '"qü"' in text)
    with pytest.raises(data.DataError, match=rf"squad\.json:{line}: .*question 'qü'"):
        data.read_squad(path)


def test_an_upper_case_gz_name_is_decompressed(tmp_path):
    # "not UTF-8 (byte 0x8b)" before: only a lower-case .gz was read as gzip
    path = tmp_path / "TRAIN.TXT.GZ"
    path.write_bytes(gzip.compress(b"eins\nzwei\n"))
    assert data.read_text(path) == "eins\nzwei\n"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_csv_error_names_the_line_after_quoted_line_breaks(tmp_path, newline):
    # a quoted CSV field may hold line breaks; errors named the row's number (4), not its line (5)
    lines = ["sentence,label", '"a text on', 'two lines",pos', '"ok",neg', '"one field too many",pos,extra']
    path = tmp_path / "multi.csv"
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    bad = next(n for n, line in enumerate(lines, 1) if line.endswith("extra"))  # the line an editor shows: 5
    with pytest.raises(DataError, match=rf"multi\.csv:{bad}: expected 2 fields like the header, got 3"):
        read_labelled(path)
    path.write_bytes(newline.join([*lines[:-1], '"empty label",']).encode())
    with pytest.raises(DataError, match=rf"multi\.csv:{bad}: empty label"):
        read_labelled(path)
    path.write_bytes(newline.join(lines[:-1]).encode())
    assert read_labelled(path) == [("a text on\ntwo lines", "pos"), ("ok", "neg")]


def test_reading_squad_looks_up_no_question_line_unless_there_is_an_error(tmp_path, monkeypatch):
    # Every question searched the whole file for its id (the line an error would name), errors or not: reading
    # 5,000 questions took 5 s, 20,000 took 136 s. Searches are made for an error only: none for a good file.
    searched = []
    dumps = json.dumps
    monkeypatch.setattr(data.json, "dumps", lambda *a, **k: searched.append(a) or dumps(*a, **k))
    context = "Ann went home."
    qas = [{"id": f"q{i}", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}]} for i in range(40)]
    path = tmp_path / "squad.json"
    path.write_text(dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}, indent=1))
    assert [ex.id for ex in data.read_squad(path)] == [f"q{i}" for i in range(40)]
    assert searched == []
    qas[30]["answers"][0]["answer_start"] = 5  # the error still names the question's line
    path.write_text(dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}, indent=1))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if '"q30"' in text)
    with pytest.raises(DataError, match=rf"squad\.json:{line}: .*question 'q30'\), answers\[0\]: field 'answer_st"):
        data.read_squad(path)


def test_a_blank_line_inside_one_side_of_a_parallel_corpus_is_named_also_when_the_counts_differ(tmp_path):
    """A sentence lost to a blank line on one side shifts every later pair; the error named only the two line
    counts, leaving the user to hunt for the line."""
    src, tgt = tmp_path / "a.de", tmp_path / "a.en"
    src.write_text("eins\nzwei\n\ndrei\n")
    tgt.write_text("one\ntwo\nthree\n")
    with pytest.raises(DataError, match=r"a\.de:3: empty sentence in a parallel file.*a\.de has 4 lines but "
                                        r".*a\.en has 3"):
        data.read_parallel(src, tgt)
    src.write_text("eins\nzwei\ndrei\n")
    tgt.write_text("one\n \ntwo\nthree\n")
    with pytest.raises(DataError, match=r"a\.en:2: empty sentence in a parallel file"):
        data.read_parallel(src, tgt)
    tgt.write_text("one\ntwo\n")  # no blank line: the counts
    with pytest.raises(DataError, match=r"a\.de has 3 lines but .*a\.en has 2: the files are not aligned"):
        data.read_parallel(src, tgt)


def test_a_header_naming_the_text_or_label_column_twice_is_refused(tmp_path):
    """`sentence<TAB>label<TAB>label` (e.g. gold and predicted labels) read the first 'label' without a word."""
    path = tmp_path / "x.tsv"
    path.write_text("sentence\tlabel\tlabel\ngood\t1\t0\n")
    with pytest.raises(DataError, match=r"x\.tsv:1: the header names 'label' twice \(columns 2 and 3\)"):
        read_labelled(path)
    path.write_text("sentence\tlabel\tsentence\ngood\t1\tbad\n")
    with pytest.raises(DataError, match=r"x\.tsv:1: the header names 'sentence' twice \(columns 1 and 3\)"):
        read_labelled(path)
    path.write_text("sentence\tlabel\tnote\tnote\ngood\t1\ta\tb\n")  # a column not read may repeat
    assert read_labelled(path) == [("good", "1")]


def test_a_gzip_file_not_named_gz_is_named_as_gzip_not_as_another_encoding(tmp_path):
    """`train.de` holding gzip data (downloaded, renamed) was 'not UTF-8 text (byte 0x8b ...); convert the file
    to UTF-8': advice that does not help."""
    path = tmp_path / "train.de"
    path.write_bytes(gzip.compress(b"Ein Mann.\n"))
    with pytest.raises(DataError, match=r"train\.de: gzip-compressed, but its name does not end in \.gz"):
        data.read_text(path)
    (tmp_path / "train.de.gz").write_bytes(path.read_bytes())  # the advice works
    assert data.read_text(tmp_path / "train.de.gz") == "Ein Mann.\n"


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_a_line_of_spaces_in_a_labelled_file_is_a_blank_line_as_in_jsonl(tmp_path, suffix):
    """A blank line is skipped; one holding a space or a tab-free run of spaces was 'expected 2 fields like the
    header, got 1' in a TSV/CSV while JSONL skipped it."""
    rows = {".tsv": ["sentence\tlabel", "good\t1", "   ", "bad\t0"], ".csv": ["sentence,label", "good,1", "   ",
            "bad,0"], ".jsonl": ['{"sentence": "good", "label": 1}', "   ", '{"sentence": "bad", "label": 0}']}
    path = tmp_path / f"x{suffix}"
    path.write_text("\r\n".join(rows[suffix]) + "\r\n")
    assert read_labelled(path) == [("good", "1"), ("bad", "0")]


@pytest.mark.parametrize("name", ["x.CSV", "x.Csv.GZ", "x.JSONL", "x.jsonl.GZ"])
def test_a_labelled_files_format_is_read_from_its_extension_in_any_case(tmp_path, name):
    """open_text takes .GZ as .gz; read_labelled read x.CSV (Windows) as a TSV: "no column 'sentence' in the
    header ['sentence,label']"."""
    text = ('sentence,label\n"good, really",1\n' if ".csv" in name.lower()
            else '{"sentence": "good, really", "label": 1}\n')
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.lower().endswith(".gz") else text.encode())
    assert read_labelled(path) == [("good, really", "1")]


def test_random_batches_with_drop_last_keep_every_full_batch():
    # a drop_last cut at count - size (not count - size + 1) dropped the last batch whenever size divides count
    for count in range(0, 13):
        for size in range(1, 6):
            got = data.random_batches(count, size, seed=3, epoch=0, drop_last=True)
            assert len(got) == count // size and all(len(b) == size for b in got), (count, size)
            assert len({i for b in got for i in b}) == count // size * size


def test_bucketed_batches_come_in_a_random_order_not_by_length():
    # the docstring's "the batches shuffled again": without it every pool's batches ran shortest to longest
    lengths = [1 + (i * 37) % 50 for i in range(400)]  # 50 distinct lengths, spread over the indices
    for seed in range(3):
        batches = data.bucket_batches(lengths, 100, seed=seed, epoch=0, pool=1000)  # one pool: all sorted together
        longest = [max(lengths[i] for i in b) for b in batches]
        assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
        assert sorted(i for b in batches for i in b) == list(range(400))
    unshuffled = data.bucket_batches(lengths, 100, seed=0, epoch=0, pool=1000, shuffle=False)
    longest = [max(lengths[i] for i in b) for b in unshuffled]
    assert longest == sorted(longest)  # the oracle's premise: within a pool, the cut batches are in length order


def test_every_blank_line_at_the_end_of_a_parallel_file_is_ignored(tmp_path):
    # editors leave several newlines at the end; only the first blank line was dropped, the next read as an empty pair
    (tmp_path / "src.txt").write_text("a b\nc d\n\n\n \n")
    (tmp_path / "tgt.txt").write_text("x y\nz w\n\n")
    assert read_parallel(tmp_path / "src.txt", tmp_path / "tgt.txt") == [("a b", "x y"), ("c d", "z w")]
    (tmp_path / "pairs.tsv").write_text("a b\tx y\n\n\n")
    assert read_parallel(tmp_path / "pairs.tsv") == [("a b", "x y")]


def test_a_header_that_is_a_long_line_of_text_is_quoted_cut(tmp_path):
    # `maskattn evaluate CLASSIFIER --data book.txt` repeated the book's whole first line (~10 KB) as "the header"
    line = "First Citizen: " + "before we proceed any further, hear me speak. " * 220
    book = tmp_path / "book.txt"
    book.write_text(line + "\nAll: Speak, speak.\n")
    with pytest.raises(DataError) as raised:
        data.read_labelled(book)
    said = str(raised.value)
    assert said.startswith(f"{book}:1: no column 'sentence' in the header ['First Citizen: before we proceed")
    assert said.endswith("...") and len(said) <= len(str(book)) + 120 and len(line) > 10_000
    short = tmp_path / "x.tsv"
    short.write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match=rf"x\.tsv:1: no column 'sentence' in the header "
                       rf"{re.escape(repr(['text', 'label']))}$"):  # a header of a few names: whole
        data.read_labelled(short)
