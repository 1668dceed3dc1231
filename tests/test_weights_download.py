"""Pretrained weights from URLs: downloaded once into the cache, SHA-256 checked,
read with the same safety as local files. Offline: a local HTTP server on
127.0.0.1 and ``file://`` URLs."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from eventful_pl.checkpoints import UntrustedCheckpointError, read_checkpoint
from eventful_pl.lightning.vitdet_module import ViTDetModule
from eventful_pl.lightning.vivit_module import ViViTFineTuning
from eventful_pl.weights import (
    CACHE_ENV,
    WeightsDownloadError,
    cache_file_name,
    default_cache_dir,
    resolve_weights,
    split_sha256,
)


class CodeInPickle:
    """Pickled by reference: reading a file holding one would import and run code."""


class Server:
    """Serves ``root`` over HTTP on 127.0.0.1 and counts the GET requests per path."""

    def __init__(self, root: Path) -> None:
        self.requests: dict[str, int] = {}
        counts = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):  # noqa: N802 (http.server's name)
                counts[self.path] = counts.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args):  # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    serving = Server(root)
    yield serving, root
    serving.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_http_url_is_downloaded_once(server, tmp_path):
    serving, root = server
    data = b"weights " * 1000
    (root / "model_final.pkl").write_bytes(data)
    url = f"{serving.url}/model_final.pkl"
    cache = tmp_path / "cache"
    first = resolve_weights(url, cache_dir=cache, progress=False)
    assert first.read_bytes() == data
    assert first.parent == cache and first.name == cache_file_name(url)
    assert first.name.endswith("-model_final.pkl")  # the format's suffix is kept
    second = resolve_weights(url, cache_dir=cache, progress=False)
    assert second == first
    assert serving.requests == {"/model_final.pkl": 1}  # the second call did not fetch
    assert cache_files(cache) == [first.name]  # no temporary file left behind
    # With the hash (suffix or argument) the cached file is checked, still not fetched.
    assert resolve_weights(f"{url}#sha256={sha(data)}", cache_dir=cache) == first
    assert resolve_weights(url, sha256=sha(data).upper(), cache_dir=cache) == first
    assert serving.requests == {"/model_final.pkl": 1}


def test_same_file_name_at_two_urls_gets_two_cache_files(server, tmp_path):
    serving, root = server
    for folder, content in (("a", b"first"), ("b", b"second")):
        (root / folder).mkdir()
        (root / folder / "w.pth").write_bytes(content)
    cache = tmp_path / "cache"
    a = resolve_weights(f"{serving.url}/a/w.pth", cache_dir=cache, progress=False)
    b = resolve_weights(f"{serving.url}/b/w.pth?download=1", cache_dir=cache, progress=False)
    assert a != b and (a.read_bytes(), b.read_bytes()) == (b"first", b"second")
    assert b.name.endswith("-w.pth")  # the query is not part of the name


def test_sha256_mismatch_is_refused_and_nothing_is_kept(server, tmp_path):
    serving, root = server
    (root / "w.pth").write_bytes(b"tampered")
    url = f"{serving.url}/w.pth"
    cache = tmp_path / "cache"
    wrong = sha(b"the real weights")
    with pytest.raises(WeightsDownloadError) as error:
        resolve_weights(f"{url}#sha256={wrong}", cache_dir=cache, progress=False)
    message = str(error.value)
    assert url in message and wrong in message and sha(b"tampered") in message
    assert "deleted" in message
    assert cache_files(cache) == []  # the partial download was removed
    # The right hash downloads it (a second request: nothing was cached).
    path = resolve_weights(url, sha256=sha(b"tampered"), cache_dir=cache, progress=False)
    assert path.read_bytes() == b"tampered" and serving.requests["/w.pth"] == 2


def test_a_cached_file_that_fails_a_later_hash_names_the_remedy(server, tmp_path):
    serving, root = server
    (root / "w.pth").write_bytes(b"abc")
    url = f"{serving.url}/w.pth"
    cached = resolve_weights(url, cache_dir=tmp_path, progress=False)
    with pytest.raises(WeightsDownloadError, match=f"Delete the cached file {cached}"):
        resolve_weights(url, sha256="0" * 64, cache_dir=tmp_path)
    assert cached.read_bytes() == b"abc" and serving.requests["/w.pth"] == 1


def test_missing_url_is_a_clear_error(server, tmp_path):
    serving, _ = server
    url = f"{serving.url}/nothing_here.pth"
    with pytest.raises(WeightsDownloadError, match=f"cannot download {url}: HTTP Error 404"):
        resolve_weights(url, cache_dir=tmp_path / "cache", progress=False)
    assert cache_files(tmp_path / "cache") == []


def test_file_url_is_copied_once_into_the_cache(tmp_path):
    source = tmp_path / "w.pth"
    source.write_bytes(b"local")
    cache = tmp_path / "cache"
    url = source.as_uri()
    path = resolve_weights(url, cache_dir=cache, progress=False)
    assert path.parent == cache and path.read_bytes() == b"local"
    source.unlink()  # gone from its origin: the cache answers
    assert resolve_weights(url, cache_dir=cache, progress=False) == path


def test_local_paths_and_the_cache_folder(tmp_path, monkeypatch):
    local = tmp_path / "w.pth"
    local.write_bytes(b"x")
    assert resolve_weights(str(local)) == local
    assert resolve_weights(f"{local}#sha256={sha(b'x')}") == local
    with pytest.raises(WeightsDownloadError, match="expected 0{64}, got"):
        resolve_weights(str(local), sha256="0" * 64)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == Path(torch.hub.get_dir()) / "eventful_pl"
    url = local.as_uri()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env_cache"))
    assert resolve_weights(url, progress=False).parent == tmp_path / "env_cache"


@pytest.mark.parametrize(
    "source, sha256, match",
    [
        ("s3://bucket/w.pth", None, "scheme 's3' is not one of https://, http://, file://"),
        ("w.pth#sha256=abc", None, "must be 64 hex digits"),
        ("w.pth", "xyz", "must be 64 hex digits"),
        (f"w.pth#sha256={'a' * 64}", "b" * 64, "keep one of them"),
    ],
)
def test_bad_sources_raise_value_errors(tmp_path, source, sha256, match):
    with pytest.raises(ValueError, match=match):
        resolve_weights(source, sha256=sha256, cache_dir=tmp_path)


def test_split_sha256():
    digest = "A" * 64
    assert split_sha256(f"https://x/w.pth#sha256={digest}") == ("https://x/w.pth", "a" * 64)
    assert split_sha256("https://x/w.pth#frag") == ("https://x/w.pth#frag", None)


def test_downloaded_checkpoint_keeps_the_untrusted_pickle_refusal(server, tmp_path):
    serving, root = server
    torch.save({"model": {"weight": torch.zeros(2)}, "extra": CodeInPickle()}, root / "evil.pth")
    path = resolve_weights(f"{serving.url}/evil.pth", cache_dir=tmp_path, progress=False)
    with pytest.raises(UntrustedCheckpointError, match="trust_pretrained"):
        read_checkpoint(path)
    assert isinstance(read_checkpoint(path, trusted=True)["weight"], torch.Tensor)


def test_pretrained_url_loads_into_the_lightning_modules(server, tmp_path, monkeypatch):
    """``pretrained: <url>#sha256=...`` loads the served weights, fetched once."""
    serving, root = server
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    torch.manual_seed(0)
    source = ViTDetModule(preset="vitdet_tiny", variant="dense")
    torch.save(source.model.state_dict(), root / "vitdet.pth")
    digest = sha((root / "vitdet.pth").read_bytes())
    url = f"{serving.url}/vitdet.pth#sha256={digest}"
    for seed in (1, 2):
        torch.manual_seed(seed)
        lit = ViTDetModule(preset="vitdet_tiny", variant="dense", pretrained=url)
        lit.load_pretrained()
        for name, value in source.model.state_dict().items():
            torch.testing.assert_close(lit.model.state_dict()[name], value, msg=name)
    assert serving.requests == {"/vitdet.pth": 1}

    torch.manual_seed(0)
    vivit = ViViTFineTuning(preset="vivit_tiny", spatial_variant="dense", r=None)
    torch.save(vivit.model.state_dict(), root / "vivit.pth")
    torch.manual_seed(1)
    lit = ViViTFineTuning(
        preset="vivit_tiny", spatial_variant="dense", r=None, pretrained=f"{serving.url}/vivit.pth"
    )
    lit.load_pretrained()
    for name, value in vivit.model.state_dict().items():
        torch.testing.assert_close(lit.model.state_dict()[name], value, msg=name)


def test_timm_loader_takes_a_url(tmp_path, monkeypatch):
    """``load_timm_vit`` resolves a ``file://`` URL through the cache too."""
    import timm

    from eventful_pl.models.vit import EventfulViT, load_timm_vit

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    torch.save(net.state_dict(), tmp_path / "vit.pth")
    model = EventfulViT(image_size=32, dim=192, depth=2, heads=3)
    digest = sha((tmp_path / "vit.pth").read_bytes())
    load_timm_vit(model, f"{(tmp_path / 'vit.pth').as_uri()}#sha256={digest}")
    assert [p.name for p in (tmp_path / "cache").iterdir()][0].endswith("-vit.pth")
    torch.testing.assert_close(model.state_dict()["head.weight"], net.state_dict()["head.weight"])
