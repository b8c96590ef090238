"""The default model's fetch: one conversion however many processes ask at once, never a half folder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from rlora.train import models


@pytest.fixture
def slow_fake_convert(tmp_path, monkeypatch):
    """A conversion that takes a while and writes its files one after another; counts its calls."""
    monkeypatch.setenv("RLORA_HOME", str(tmp_path / "home"))
    calls: list[Path] = []

    def fake(out: Path, say) -> None:
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"weights")
        time.sleep(0.3)  # a window in which a second fetcher would see a half-written folder
        (out / "tokenizer.json").write_text("{}")
        (out / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(models, "download_and_convert", fake)
    return calls


def test_concurrent_fetches_convert_once_and_all_see_a_whole_folder(slow_fake_convert):
    # Threads stand in for processes: flock locks belong to each open file, so they exclude each other too.
    results: list[Path | BaseException] = []

    def fetch() -> None:
        try:
            folder = models.fetch_default_model(quiet=True)
            assert (folder / "config.json").exists(), "fetch returned before the folder was complete"
            results.append(folder)
        except BaseException as e:  # surfaced below
            results.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, Path) for r in results), results
    assert len(slow_fake_convert) == 1
    out = models.default_model_dir()
    assert set(results) == {out}
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".lock"]


def test_a_failed_conversion_leaves_nothing_and_the_next_fetch_succeeds(tmp_path, monkeypatch):
    monkeypatch.setenv("RLORA_HOME", str(tmp_path / "home"))

    def broken(out: Path, say) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion died")

    monkeypatch.setattr(models, "download_and_convert", broken)
    with pytest.raises(RuntimeError, match="conversion died"):
        models.fetch_default_model(quiet=True)
    out = models.default_model_dir()
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name + ".lock"]  # no staging folder left behind

    def works(out: Path, say) -> None:
        (out / "model.safetensors").write_bytes(b"w")
        (out / "tokenizer.json").write_text("{}")
        (out / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(models, "download_and_convert", works)
    assert models.is_converted(models.fetch_default_model(quiet=True))


def test_an_incomplete_conversion_is_never_put_in_place(tmp_path, monkeypatch):
    """A converter that writes only a tokenizer (what transformers' save_pretrained did on a
    torchrun rank > 0) must fail loudly and leave no model folder for other ranks to read."""
    monkeypatch.setenv("RLORA_HOME", str(tmp_path / "home"))

    def tokenizer_only(out: Path, say: object) -> None:
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(models, "download_and_convert", tokenizer_only)
    with pytest.raises(RuntimeError, match="incomplete folder"):
        models.fetch_default_model(quiet=True)
    assert not models.default_model_dir().exists()
