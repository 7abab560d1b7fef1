"""`graft train --mode`: head registers a rank-0 model; full needs an empty --output."""

from pathlib import Path

from registry import Registry
from server.cli import main
from training import clean_examples, load_sms_spam, stratified_sample, write_csv


def _train(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["train", "--no-progress", "--max-length", "32", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_head_mode_registers_a_rank_0_model(tmp_path: Path, capsys) -> None:
    reg = str(tmp_path / "reg")
    data = tmp_path / "sms.csv"
    write_csv(stratified_sample(clean_examples(load_sms_spam()), 120, seed=0), data)
    main(["tenants", "create", "acme", "--registry", reg])
    capsys.readouterr()
    code, out, err = _train(
        capsys,
        "--mode",
        "head",
        "--registry",
        reg,
        "--tenant",
        "acme",
        "--name",
        "spam",
        "--data",
        str(data),
        "--head-epochs",
        "20",
    )
    assert code == 0, err
    assert "registered acme/spam@1 (head)" in out and "macro-F1" in out
    with Registry(reg) as registry:
        (record,) = registry.list_adapters("acme")
    assert record.rank == 0 and record.manifest["mode"] == "head"


def test_train_mode_arguments_are_checked(tmp_path: Path, capsys) -> None:
    data = tmp_path / "sms.csv"
    data.write_text("text,label\nhello,a\nbye,b\n")
    code, _, err = _train(capsys, "--mode", "full", "--data", str(data))
    assert code == 2 and "--output" in err
    code, _, err = _train(capsys, "--mode", "head", "--data", str(data), "--name", "m")
    assert code == 2 and "--tenant" in err
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "f").write_text("x")
    code, _, err = _train(capsys, "--mode", "full", "--data", str(data), "--output", str(out_dir))
    assert code == 2 and "not an empty directory" in err
    assert not (tmp_path / "reg").exists()
