"""labcore.yamlfile: the one reader of settings files (bastion.yaml, images.yaml, labctl's config)."""

from __future__ import annotations

import pytest

from labcore.yamlfile import YamlFileError, read_mapping


def test_missing_or_empty_file_is_an_empty_mapping(tmp_path):
    assert read_mapping(tmp_path / "absent.yaml") == {}
    (tmp_path / "empty.yaml").write_text("")
    assert read_mapping(tmp_path / "empty.yaml") == {}
    (tmp_path / "ok.yaml").write_text("workers: 8\nlisten: 0.0.0.0:8080\n")
    assert read_mapping(tmp_path / "ok.yaml") == {"workers": 8, "listen": "0.0.0.0:8080"}


@pytest.mark.parametrize(("text", "message"), [
    ("listen: [\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping of widgets"),
    ("just a string\n", "expected a mapping of widgets"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(YamlFileError, match=message) as exc:
        read_mapping(path, "widgets")
    assert str(exc.value).startswith(f"{path}: ")


def test_a_directory_in_its_place_cannot_be_read(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(YamlFileError, match="cannot be read"):
        read_mapping(tmp_path / "dir.yaml")
