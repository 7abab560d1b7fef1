"""benchmarks.precision scores only rows the demo never trained on, with the usual macro-F1."""

import pytest

from benchmarks.precision import _held_out, _macro_f1, main
from server.demo import DEMO_SAMPLE_ROWS
from training import TrainConfig, load_sms_spam
from training.data import normalise_text
from training.recipe import split_examples


def test_held_out_rows_exclude_what_the_demo_trains_on() -> None:
    # the demo's own split (server/demo.py's TrainConfig through training.recipe)
    split = split_examples(load_sms_spam(), TrainConfig(max_examples=DEMO_SAMPLE_ROWS))
    seen = {normalise_text(e.text) for e in [*split.train, *split.val]}
    rows = _held_out("sms", 500, DEMO_SAMPLE_ROWS)
    assert len(rows) == 500 and len(seen) > 700
    assert not seen & {normalise_text(e.text) for e in rows}


def test_macro_f1() -> None:
    assert _macro_f1(["a", "a", "b", "b"], ["a", "a", "b", "b"]) == 1.0
    # a: tp 1 fp 0 fn 1 -> 2/3; b: tp 2 fp 1 fn 0 -> 4/5
    assert _macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx((2 / 3 + 0.8) / 2)


def test_refuses_a_missing_registry(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--registry", str(tmp_path / "nowhere")])
    assert "make demo" in capsys.readouterr().err
