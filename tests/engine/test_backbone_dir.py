"""A backbone directory is refused when what it holds would serve nonsense quietly."""

from pathlib import Path

import pytest

from engine import load_backbone, packaged_backbone_dir


def test_a_backbone_without_its_vocabulary_is_refused(tmp_path: Path) -> None:
    """transformers builds a tokenizer of the 5 special tokens from tokenizer_config.json
    alone: every word would have been [UNK], and the server answered anyway."""
    for source in packaged_backbone_dir().iterdir():
        if source.name not in ("tokenizer.json", "vocab.txt"):
            (tmp_path / source.name).symlink_to(source)
    with pytest.raises(ValueError, match=r"tokenizer knows 5 tokens but the model embeds 30522"):
        load_backbone(tmp_path)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("model.safetensors", "its weights cannot be read"),
        ("tokenizer.json", "its tokenizer cannot be loaded"),
    ],
)
def test_a_corrupt_file_is_a_one_line_error_naming_the_directory(
    tmp_path: Path, broken: str, message: str
) -> None:
    for source in packaged_backbone_dir().iterdir():
        if source.name != broken:
            (tmp_path / source.name).symlink_to(source)
    (tmp_path / broken).write_text("garbage\n")
    with pytest.raises(ValueError, match=f"{tmp_path}: {message}"):
        load_backbone(tmp_path)
