"""The ``graft`` command line, run in-process."""

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from registry import Registry
from server.cli import main
from training import load_sms_spam, stratified_sample, write_csv


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--lr", "0"], "--lr must be > 0 and finite"),
        (["--head-lr", "nan"], "--head-lr must be > 0 and finite"),
        (["--eval-fraction", "0.9"], "--eval-fraction must be in"),
        (["--max-examples", "3"], "--max-examples must be >= 10"),
        (["--head-epochs", "0"], "--head-epochs must be >= 1"),
    ],
)
def test_train_names_the_flag_it_refuses(tmp_path: Path, capsys, flags, said: str) -> None:
    """Not the config field behind it (lora_lr for --lr), before any data is read."""
    argv = ["train", "--registry", str(tmp_path), "--tenant", "a", "--name", "b"]
    code, _, err = _run(capsys, *argv, "--data", str(tmp_path / "none.csv"), *flags)
    assert code == 2 and f"graft: error: {said}" in err, err


def test_tenants_create_prints_the_key_last(tmp_path: Path, capsys) -> None:
    reg = str(tmp_path / "reg")
    code, out, _ = _run(capsys, "tenants", "create", "acme", "--registry", reg)
    assert code == 0
    key = out.strip().splitlines()[-1]
    assert key.startswith("gk_") and " " not in key
    with Registry(reg) as registry:
        assert registry.authenticate(key) == "acme"
    code, _, err = _run(capsys, "tenants", "create", "acme", "--registry", reg)
    assert code == 2 and "acme" in err


def test_a_refused_tenant_name_makes_no_registry(tmp_path: Path, capsys) -> None:
    """Made before the name was checked, an empty registry at a mistyped path was then
    opened by every other command, which refuses a path with no registry."""
    typo = tmp_path / "regsitry"
    code, _, err = _run(capsys, "tenants", "create", "ACME", "--registry", str(typo))
    assert code == 2 and "invalid tenant name 'ACME'" in err, err
    assert not typo.exists()


def test_registry_defaults_to_env(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("GRAFT_REGISTRY", str(tmp_path / "from-env"))
    # the parser reads the environment when it is built, i.e. on each main() call
    code, _, _ = _run(capsys, "tenants", "create", "zed")
    assert code == 0 and (tmp_path / "from-env" / "catalog.sqlite3").exists()


def test_train_and_list(tmp_path: Path, capsys) -> None:
    reg = str(tmp_path / "reg")
    data = tmp_path / "sms.csv"
    write_csv(stratified_sample(load_sms_spam(), 120, seed=0), data)
    _run(capsys, "tenants", "create", "acme", "--registry", reg)
    code, out, _ = _run(
        capsys,
        "train",
        "--registry",
        reg,
        "--tenant",
        "acme",
        "--name",
        "spam",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--max-length",
        "48",
        "--no-progress",
    )
    assert code == 0, out
    assert "rows: 120" in out and "unknown tokens" in out
    assert "registered acme/spam@1" in out
    assert "adapter size:" in out and "macro-F1" in out
    code, out, _ = _run(capsys, "adapters", "list", "--tenant", "acme", "--registry", reg, "--json")
    (entry,) = json.loads(out)
    assert entry["name"] == "spam" and entry["versions"] == [1] and entry["rank"] == 8
    assert entry["labels"] == ["ham", "spam"] and entry["size_bytes"] > 0
    assert len(entry["base_sha256"]) == 64 and "accuracy" in entry["metrics"]
    code, out, _ = _run(capsys, "adapters", "list", "--tenant", "acme", "--registry", reg)
    assert "spam" in out.splitlines()[1]


def test_adapters_list_shows_which_version_unpinned_requests_get(
    tmp_path: Path, capsys, backbone, publish_random, write_random_adapter
) -> None:
    with Registry(tmp_path / "reg") as registry:
        registry.create_tenant("acme")
        for seed in (1, 2):
            publish_random(registry, "acme", "spam", seed=seed)
        registry.promote("acme", "spam", 1)  # 2 is kept, 1 serves
        write_random_adapter(backbone, tmp_path / "draft", seed=3, rank=8, num_labels=2)
        manifest = {"labels": ["neg", "pos"], "base_sha256": backbone.sha256, "rank": 8}
        registry.publish("acme", "draft", tmp_path / "draft", manifest, promote=False)
    code, out, _ = _run(
        capsys, "adapters", "list", "--tenant", "acme", "--registry", str(tmp_path / "reg")
    )
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
    assert code == 0 and out.split()[:3] == ["NAME", "LATEST", "VERSIONS"]
    assert rows == {"draft": ["none", "1"], "spam": ["1", "1,2"]}


def test_train_reports_bad_rows(tmp_path: Path, capsys) -> None:
    reg = str(tmp_path / "reg")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "a", "label": "x"}\nnot json\n{"text": "b"}\n')
    _run(capsys, "tenants", "create", "acme", "--registry", reg)
    code, _, err = _run(
        capsys,
        "train",
        "--registry",
        reg,
        "--tenant",
        "acme",
        "--name",
        "m",
        "--data",
        str(data),
        "--no-progress",
    )
    assert code == 2 and "2" in err and "3" in err
    data.write_text("".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(20)))
    argv = ["train", "--registry", reg, "--tenant", "acme", "--data", str(data), "--no-progress"]
    code, _, err = _run(capsys, *argv, "--name", "")
    assert code == 2 and "invalid adapter name ''" in err, err


def test_bulk_import_names_models_after_directories(
    tmp_path: Path, capsys, backbone, write_random_adapter
) -> None:
    reg = str(tmp_path / "reg")
    _run(capsys, "tenants", "create", "acme", "--registry", reg)
    dirs = []
    for i, name in enumerate(["legal", "hr", "Bad Name"]):
        d = tmp_path / name
        write_random_adapter(backbone, d, seed=i, rank=4, num_labels=3)
        dirs.append(str(d))
    code, out, err = _run(
        capsys,
        "adapters",
        "import",
        *dirs,
        "--tenant",
        "acme",
        "--labels",
        "a,b,c",
        "--registry",
        reg,
    )
    assert code == 1  # one directory had an invalid name; the others still landed
    assert "2 imported, 1 failed" in out and "Bad Name" in err
    with Registry(reg) as registry:
        assert sorted(r.name for r in registry.list_adapters("acme")) == ["hr", "legal"]
    code, _, err = _run(
        capsys,
        "adapters",
        "import",
        *dirs[:2],
        "--tenant",
        "acme",
        "--name",
        "x",
        "--registry",
        reg,
    )
    assert code == 2 and "--name" in err


def test_a_directory_its_manifest_refuses_fails_alone_in_a_bulk_import(
    tmp_path: Path, capsys, backbone, write_random_adapter
) -> None:
    """The registry's manifest check runs per directory, not once for the whole transaction,
    which failed every directory of it, naming the first."""
    reg = str(tmp_path / "reg")
    _run(capsys, "tenants", "create", "acme", "--registry", reg)
    for i, name in enumerate(["good", "blank"]):
        write_random_adapter(backbone, tmp_path / name, seed=i, rank=4, num_labels=3)
    (tmp_path / "good" / "labels.txt").write_text("a\nb\nc\n")
    id2label = {"id2label": {"0": "", "1": "b", "2": "c"}}  # a label PEFT writes, empty
    (tmp_path / "blank" / "config.json").write_text(json.dumps(id2label))
    dirs = [str(tmp_path / "good"), str(tmp_path / "blank")]
    code, out, err = _run(
        capsys, "adapters", "import", *dirs, "--tenant", "acme", "--registry", reg
    )
    assert code == 1 and "1 imported, 1 failed" in out
    assert "blank" in err and "non-blank strings" in err and "good" not in err
    with Registry(reg) as registry:
        assert [r.name for r in registry.list_adapters("acme")] == ["good"]


@pytest.mark.parametrize("argv", [["train", "--help"], ["serve", "--help"]])
def test_every_subcommand_takes_registry_and_backbone(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr().out
    assert "--registry" in out and "--backbone" in out


def test_tenants_set_stores_settings_and_refuses_bad_ones(tmp_path: Path, capsys) -> None:
    reg = str(tmp_path / "reg")
    _run(capsys, "tenants", "create", "acme", "--registry", reg)
    code, out, _ = _run(capsys, "tenants", "set", "acme", "--weight", "2", "--registry", reg)
    assert code == 0 and '"weight": 2.0' in out
    _run(capsys, "tenants", "set", "acme", "--max-queued-rows", "50", "--registry", reg)
    with Registry(reg) as registry:
        assert registry.tenant_settings() == {"acme": {"weight": 2.0, "max_queued_rows": 50}}
    code, _, err = _run(capsys, "tenants", "set", "acme", "--weight", "0", "--registry", reg)
    assert code == 2 and "weight" in err
    with Registry(reg) as registry:  # as an older graft, whose weights went past 1000
        registry.set_tenant_settings("acme", {"weight": 5000.0, "max_queued_rows": 50})
    code, _, err = _run(
        capsys, "tenants", "set", "acme", "--max-queued-rows", "60", "--registry", reg
    )
    assert code == 0, err  # the stored weight does not block another field's change
    code, out, _ = _run(capsys, "tenants", "list", "--registry", reg)
    assert "acme" in out and "max_queued_rows" in out
    code, _, _ = _run(capsys, "tenants", "set", "acme", "--reset", "--registry", reg)
    with Registry(reg) as registry:
        assert registry.tenant_settings() == {}


def test_a_key_that_could_not_be_printed_is_revoked_again(tmp_path: Path, capsys) -> None:
    """Standard output full or closed: nobody holds the new key, so it must not work."""
    reg = str(tmp_path / "reg")
    issued = []

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            if text.startswith("gk_"):
                issued.append(text.strip())
                raise OSError(28, "No space left on device")
            return super().write(text)

    for argv in (("tenants", "create", "acme"), ("tenants", "add-key", "acme")):
        with contextlib.redirect_stdout(Full()):
            code = main([*argv, "--registry", reg])
        assert code == 2 and "it is revoked again" in capsys.readouterr().err
    with Registry(reg) as registry:
        assert registry.has_tenant("acme")
        assert [registry.authenticate(key) for key in issued] == [None, None]


def test_only_tenants_create_makes_a_registry(tmp_path: Path, capsys) -> None:
    """Any other command at a mistyped path is refused, leaving nothing behind there."""
    typo = tmp_path / "typo-reg"
    for argv in (
        ("tenants", "list"),
        ("adapters", "list", "--tenant", "a"),
        ("tenants", "add-key", "a"),
    ):
        code, _, err = _run(capsys, *argv, "--registry", str(typo))
        assert code == 2 and f"no registry at {typo}" in err, argv
    assert not typo.exists()
    code, _, _ = _run(capsys, "tenants", "create", "acme", "--registry", str(typo))
    assert code == 0
    code, out, _ = _run(capsys, "tenants", "list", "--registry", str(typo))
    assert code == 0 and out.strip() == "acme"


def test_an_empty_environment_variable_means_the_default(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRAFT_REGISTRY", "")
    code, _, _ = _run(capsys, "tenants", "create", "zed")
    assert code == 0 and (tmp_path / "graft-registry" / "catalog.sqlite3").exists()
    assert not (tmp_path / "catalog.sqlite3").exists()  # not the working directory itself


def test_tenants_revoke_keys_one_from_stdin_or_all(tmp_path: Path, capsys, monkeypatch) -> None:
    reg = str(tmp_path / "reg")
    _, out, _ = _run(capsys, "tenants", "create", "acme", "--registry", reg)
    leaked = out.strip().splitlines()[-1]
    _, out, _ = _run(capsys, "tenants", "add-key", "acme", "--registry", reg)
    kept = out.strip().splitlines()[-1]
    monkeypatch.setattr("sys.stdin", io.StringIO(leaked + "\n"))
    code, out, _ = _run(capsys, "tenants", "revoke-keys", "acme", "--key-stdin", "--registry", reg)
    assert code == 0 and "revoked one API key" in out
    with Registry(reg) as registry:
        assert registry.authenticate(leaked) is None and registry.authenticate(kept) == "acme"
    monkeypatch.setattr("sys.stdin", io.StringIO(leaked + "\n"))
    code, _, err = _run(capsys, "tenants", "revoke-keys", "acme", "--key-stdin", "--registry", reg)
    assert code == 2 and "not one of the keys of tenant 'acme'" in err
    for stdin in ("", "\n  \n"):  # nothing to revoke is said so, not "not one of its keys"
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code, _, err = _run(
            capsys, "tenants", "revoke-keys", "acme", "--key-stdin", "--registry", reg
        )
        assert code == 2 and "read no API key" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n" + kept + "\n"))  # a blank line first
    code, out, _ = _run(capsys, "tenants", "revoke-keys", "acme", "--key-stdin", "--registry", reg)
    assert code == 0 and "revoked one API key" in out
    _, out, _ = _run(capsys, "tenants", "add-key", "acme", "--registry", reg)
    kept = out.strip().splitlines()[-1]
    code, out, _ = _run(capsys, "tenants", "revoke-keys", "acme", "--registry", reg)
    assert code == 0 and "revoked 1 API key(s)" in out
    with Registry(reg) as registry:
        assert registry.authenticate(kept) is None


def test_serve_flags_reach_the_engine_config(tmp_path: Path) -> None:
    from server.cli import _parser, engine_config

    args = _parser().parse_args(
        ["serve", "--registry", str(tmp_path), "--dtype", "bfloat16", "--threads", "1"]
    )
    config = engine_config(args)
    assert (config.dtype, config.num_threads) == ("bfloat16", 1)
    assert engine_config(_parser().parse_args(["serve"])).dtype == "float32"
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--dtype", "int8"])
    quantized = _parser().parse_args(["serve", "--registry", str(tmp_path), "--quantize", "int8"])
    assert engine_config(quantized).quantize == "int8"
    assert engine_config(_parser().parse_args(["serve"])).quantize == "none"
    both = _parser().parse_args(["serve", "--quantize", "int8", "--dtype", "bfloat16"])
    with pytest.raises(ValueError, match="float32 activations"):
        engine_config(both)
    for flags, plan_ahead in (
        ([], False),
        (["--device", "cuda"], True),  # the device's default
        (["--device", "cuda", "--no-plan-ahead"], False),
        (["--no-plan-ahead"], False),
        (["--plan-ahead"], True),
    ):
        parsed = _parser().parse_args(["serve", *flags])
        assert engine_config(parsed).uses_plan_ahead is plan_ahead, flags


def test_serve_takes_a_number_of_front_end_processes() -> None:
    from server.cli import _parser

    assert _parser().parse_args(["serve"]).workers == 0
    assert _parser().parse_args(["serve", "--workers", "4"]).workers == 4
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["serve", "--workers", bad])


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--port", "99999"],  # the OS would have bound 99999 % 65536 = 34463
        ["serve", "--port", "-1"],
        ["serve", "--threads", "0"],
        ["serve", "--max-batch-rows", "0"],
        ["serve", "--adapter-pages", "-8"],
        ["serve", "--train-jobs", "0"],
        ["serve", "--train-max-upload-mb", "nan"],
        ["train", "--tenant", "a", "--name", "b", "--data", "x.csv", "--threads", "0"],
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_flag(argv, capsys) -> None:
    from server.cli import _parser

    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert f"argument {argv[-2]}: '{argv[-1]}'" in capsys.readouterr().err


def test_the_adapter_pool_can_be_sized_in_bytes_or_pages_not_both(tmp_path: Path) -> None:
    from server.cli import _parser, engine_config
    from server.cli_args import byte_size

    assert byte_size("4GiB") == 4 << 30 and byte_size("1.5 GB") == 1_500_000_000
    assert byte_size("512") == 512 and byte_size("64kib") == 65536
    for bad in ("lots", "4 GiBs", "0", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_size(bad)
    args = _parser().parse_args(
        ["serve", "--registry", str(tmp_path), "--adapter-pool-bytes", "4MiB"]
    )
    assert engine_config(args).adapter_pool_bytes == 4 << 20
    assert engine_config(_parser().parse_args(["serve"])).adapter_pool_bytes is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--adapter-pages", "64", "--adapter-pool-bytes", "1GiB"])


def test_metrics_flags_and_key(monkeypatch) -> None:
    from server.app import metrics_key_from_env
    from server.cli import _parser

    assert _parser().parse_args(["serve"]).metrics is True
    assert _parser().parse_args(["serve", "--no-metrics"]).metrics is False
    assert _parser().parse_args(["demo", "--no-metrics"]).metrics is False
    monkeypatch.delenv("GRAFT_METRICS_KEY", raising=False)
    assert metrics_key_from_env() is None
    monkeypatch.setenv("GRAFT_METRICS_KEY", "")  # set but empty: open, as if unset
    assert metrics_key_from_env() is None
    monkeypatch.setenv("GRAFT_METRICS_KEY", "s3cret")
    assert metrics_key_from_env() == "s3cret"


def test_graft_serve_on_port_0_announces_the_port_it_got(tmp_path: Path) -> None:
    """The real CLI in its own process: the start line names the bound port, the server
    answers there (metrics included) and SIGTERM stops it cleanly."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    from server.cli import main

    assert main(["--registry", str(tmp_path / "registry"), "tenants", "create", "acme"]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRAFT_METRICS_KEY="")
    command = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--threads", "1"]
    server = subprocess.Popen(
        [*command, "--registry", str(tmp_path / "registry")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        line = server.stdout.readline()  # blocks until the start line (or the process ends)
        found = re.search(r"graft serving on (http://127\.0\.0\.1:(\d+)) ", line)
        assert found and int(found.group(2)) > 0, line
        with urllib.request.urlopen(found.group(1) + "/metrics", timeout=30) as response:
            assert response.status == 200 and response.headers["X-Request-ID"]
            assert "graft_ready 1.0" in response.read().decode()
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_global_options_hold_before_or_after_the_command_name() -> None:
    from server.cli import _parser

    parser = _parser()
    before = parser.parse_args(["--registry", "/srv/a", "--backbone", "/m", "-v", "serve"])
    assert (before.registry, before.backbone, before.verbose) == ("/srv/a", "/m", True)
    after = parser.parse_args(["serve", "--registry", "/srv/b", "-v"])
    assert (after.registry, after.verbose) == ("/srv/b", True)
    both = parser.parse_args(["--registry", "/srv/a", "tenants", "list", "--registry", "/srv/b"])
    assert both.registry == "/srv/b"  # the one nearer the command wins
    neither = parser.parse_args(["adapters", "list", "--tenant", "acme"])
    assert neither.registry == os.environ.get("GRAFT_REGISTRY", "graft-registry")
    assert neither.backbone == os.environ.get("GRAFT_BACKBONE") and neither.verbose is False


def test_demo_serves_with_the_training_flags_it_accepts(tmp_path, monkeypatch) -> None:
    """graft demo took --train-* as serve does, then served without them."""
    from server import app as app_module
    from server import demo
    from server.cli import _parser, engine_config

    seen = {}

    async def fake_run_server(*args, **kwargs) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(app_module, "run_server", fake_run_server)
    monkeypatch.setattr(demo, "_has_model", lambda registry, name: True)
    argv = ["demo", "--registry", str(tmp_path / "reg"), "--train-max-upload-mb", "1"]
    argv += ["--train-jobs", "3"]
    args = _parser().parse_args(argv)
    assert demo.run_demo(args, engine_config(args)) == 0
    training = seen["training"]
    assert training.max_upload_bytes == 1 << 20 and training.max_running == 3


def test_serve_refuses_a_path_that_holds_no_registry(tmp_path, capsys) -> None:
    """A mistyped --registry served a new, empty registry that answered every key 401."""
    from server.cli import main

    assert main(["serve", "--registry", str(tmp_path / "typo"), "--port", "0"]) == 2
    assert "no registry at" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
