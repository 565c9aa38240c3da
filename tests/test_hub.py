"""A bridge on the Hub: the encoder id its files record, its model card, and the upload.

The upload goes to a Hub served here (StubHub: the endpoints huggingface_hub's HfApi.create_repo and
upload_folder call, with LFS for the weights), and comes back through the Hugging Face cache's own layout.
The bridge is trained on real easy-VQA features of a tiny CLIP vision tower kept in that cache as a Hub id.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import h5py
import numpy as np
import pytest
import torch
import yaml

from pipeline.api import Bridge, encoder_to_load
from pipeline.bridge import save_bridge
from pipeline.errors import ConfigError, MismatchError
from pipeline.extraction import extract_split
from pipeline.encoders import load_encoder
from pipeline.features import FeatureCache, features_file
from pipeline.hub import HubError
from pipeline.model_ids import model_id
from pipeline.manifest import Manifest, read_manifest
from pipeline.paths import Dirs
from pipeline.tasks.registry import PRIMARY
from pipeline.tasks.summary import study_setting
from stages import evaluate_retrieval, extract, train
from tiny_models import save_tiny_clip_vision
from vlap import cli
from vlap.params_file import as_dict
from vlap.study import CORRECTION, summarise

pytestmark = pytest.mark.slow  # extracts, trains and evaluates a small bridge

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLIP_ID = "someone/tiny-clip"
TOKEN = "hf_test"


# ---------------------------------------------------------------- a Hub served here
class StubHub:
    """The Hub endpoints HfApi.create_repo and HfApi.upload_folder call (as read in huggingface_hub's source:
    create, validate-yaml, preupload, LFS batch, PUT, verify, commit), on 127.0.0.1. `repos[repo][path]` holds
    what the last commits left; `requests` each (method, path, Authorization) received. `lfs`: the file
    suffixes it asks to be uploaded by LFS (the Hub: weights), the others being sent in the commit itself."""

    def __init__(self, lfs: tuple[str, ...] = (".safetensors",)):
        self.lfs = lfs
        self.repos: dict[str, dict[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self.route("GET")

            def do_POST(self):
                self.route("POST")

            def do_PUT(self):
                self.route("PUT")

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while size := int(self.rfile.readline().strip(), 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def reply(self, status: int, payload: dict | None = None, headers: dict | None = None) -> None:
                data = json.dumps(payload or {}).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def route(self, method: str) -> None:
                path, body = urlsplit(self.path).path, self.body()
                hub.requests.append((method, path, self.headers.get("Authorization")))
                if not path.startswith("/lfs/") and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                for pattern, handler in ROUTES:
                    match = re.fullmatch(pattern, f"{method} {path}")
                    if match:
                        return handler(hub, self, body, **match.groupdict())
                self.reply(404, {"error": f"no such endpoint: {method} {path}"})

        return Handler

    # each endpoint: (hub, request, body, **path groups) -> a reply
    def create(self, req, body):
        payload = json.loads(body)
        repo = f"{payload['organization']}/{payload['name']}"
        if repo in self.repos:
            return req.reply(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"})
        self.repos[repo] = {}
        req.reply(200, {"url": f"{self.url}/{repo}"})

    def validate_yaml(self, req, body):
        content = json.loads(body)["content"]
        front = content.split("---\n")[1] if content.startswith("---\n") else ""
        if not isinstance(yaml.safe_load(front), dict):
            return req.reply(400, {"errors": [{"message": "README.md: no metadata"}]})
        req.reply(200, {"errors": [], "warnings": []})

    def preupload(self, req, body, repo, rev):
        if repo not in self.repos:
            return req.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(self.lfs) else "regular",
                  "shouldIgnore": False, "oid": None} for f in json.loads(body)["files"]]
        req.reply(200, {"files": files, "commitOid": COMMIT})

    def lfs_batch(self, req, body, repo):
        objects = []
        for o in json.loads(body)["objects"]:
            actions = None if o["oid"] in self.blobs else {
                "upload": {"href": f"{self.url}/lfs/{o['oid']}"},
                "verify": {"href": f"{self.url}/api/lfs-verify/{repo}"}}
            objects.append({"oid": o["oid"], "size": o["size"]} | ({"actions": actions} if actions else {}))
        req.reply(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, req, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            return req.reply(400, {"error": "content does not match its oid"})
        self.blobs[oid] = body
        req.reply(200)

    def lfs_verify(self, req, body, repo):
        o = json.loads(body)
        ok = len(self.blobs.get(o["oid"], b"")) == o["size"]
        req.reply(200 if ok else 404, {} if ok else {"error": "object not uploaded"})

    def commit(self, req, body, repo, rev):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = dict(self.repos[repo])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.blobs:
                    return req.reply(400, {"error": f"{value['path']}: LFS object not uploaded"})
                files[value["path"]] = self.blobs[value["oid"]]
        self.repos[repo] = files
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo": repo, "summary": lines[0]["value"]["summary"], "oid": oid,
                             "keys": sorted({line["key"] for line in lines[1:]})})
        req.reply(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}"})


REPO_ID = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [
    ("POST /api/repos/create", StubHub.create),
    ("POST /api/validate-yaml", StubHub.validate_yaml),
    (rf"POST /api/models/{REPO_ID}/preupload/(?P<rev>[^/]+)", StubHub.preupload),
    (rf"POST /{REPO_ID}\.git/info/lfs/objects/batch", StubHub.lfs_batch),
    (r"PUT /lfs/(?P<oid>[0-9a-f]{64})", StubHub.lfs_put),
    (rf"POST /api/lfs-verify/{REPO_ID}", StubHub.lfs_verify),
    (rf"POST /api/models/{REPO_ID}/commit/(?P<rev>[^/]+)", StubHub.commit),
]


@pytest.fixture
def hub(monkeypatch):
    """A Hub on 127.0.0.1 that huggingface_hub may reach (online; LFS uploads, as without hf_xet)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # xet storage is not served here
    stub = StubHub()
    yield stub
    stub.close()


def as_cache(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """`files` as the Hugging Face cache keeps a repo: models--<owner>--<name>/refs/main -> snapshots/<commit>/."""
    top = cache / f"models--{repo.replace('/', '--')}"
    (top / "snapshots" / COMMIT).mkdir(parents=True)
    for name, data in files.items():
        (top / "snapshots" / COMMIT / name).write_bytes(data)
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text(COMMIT)
    return top / "snapshots" / COMMIT


# ---------------------------------------------------------------- a bridge trained on a Hub encoder
@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory):
    """A Hugging Face cache holding a tiny CLIP vision tower as someone/tiny-clip, and its snapshot folder."""
    cache = tmp_path_factory.mktemp("hf-cache")
    snapshot = as_cache(cache, CLIP_ID, {})
    save_tiny_clip_vision(snapshot)
    return cache, snapshot


@pytest.fixture(scope="module")
def clip_bridge(tiny_pipeline, smollm2, clip_cache, tmp_path_factory):
    """(cfg, data root) with the tiny pipeline's prepared data and prototypes, features of hf:someone/tiny-clip
    (read from the cache above, offline), a limber bridge trained 3 steps on them and its retrieval evaluation."""
    import huggingface_hub.constants

    cfg, dirs = tiny_pipeline
    cache, _ = clip_cache
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        root = Dirs.under(tmp_path_factory.mktemp("clip-data"))
        dirs.sharing_inputs(root.root, names=("prepared", "prototypes"))
        cfg = dataclasses.replace(
            cfg, extract=dataclasses.replace(cfg.extract, encoder=f"hf:{CLIP_ID}", batch_size=16),
            train=dataclasses.replace(cfg.train, steps=3, batch_size=4, checkpoint_every=100))
        extract.run(cfg, root)
        train.run(cfg, root, "limber", lm=smollm2)
        evaluate_retrieval.run(cfg, root, "limber", lm=smollm2)
        yield cfg, root


def test_feature_files_and_bridges_name_the_encoder_by_its_id_never_by_a_machine_path(
        clip_cache, clip_bridge, tiny_pipeline, easyvqa_root, manifest32, tmp_path):
    _, snapshot = clip_cache
    cfg, root = clip_bridge
    with h5py.File(features_file(root.features, "train"), "r") as f:
        assert f.attrs["encoder"] == f"hf:{CLIP_ID}"
    config = json.loads((root.models / "limber" / "config.json").read_text())
    assert config["encoder"] == f"hf:{CLIP_ID}"
    # the default encoder's record is its spec, as before
    with h5py.File(features_file(tiny_pipeline[1].features, "train"), "r") as f:
        assert f.attrs["encoder"] == "efficientnet-lite0"
    assert model_id("efficientnet-lite0") == "efficientnet-lite0" and model_id(f"hf:{CLIP_ID}") == f"hf:{CLIP_ID}"
    # a cache snapshot named by its path is the repo id; another folder is its name, wherever it lies
    assert model_id(f"hf:{snapshot}") == f"hf:{CLIP_ID}"
    copies = [shutil.copytree(snapshot, tmp_path / machine / "clip") for machine in ("here", "there")]
    assert model_id(f"hf:{copies[0]}/") == model_id(f"hf:{copies[1]}") == "hf-folder:clip"
    four = Manifest(manifest32.split, manifest32.image_root, manifest32.images[:4])
    files = [extract_split(four, easyvqa_root, load_encoder(f"hf:{c}", torch.device("cpu")), tmp_path / f"f{i}",
                           batch_size=4).path for i, c in enumerate(copies)]
    assert files[0].name == files[1].name and files[0].read_bytes() == files[1].read_bytes()
    with h5py.File(files[0], "r") as f:
        assert f.attrs["encoder"] == "hf-folder:clip" and str(copies[0]) not in json.dumps(dict(f.attrs.items()),
                                                                                          default=str)


def test_a_bridge_loads_its_encoder_from_the_recorded_id_and_names_what_it_cannot_locate(clip_cache, clip_bridge,
                                                                                         tmp_path):
    _, snapshot = clip_cache
    cfg, root = clip_bridge
    folder = root.models / "limber"
    bridge = Bridge.load(folder, "cpu")  # no encoder named: the recorded id, from the Hugging Face cache
    assert bridge.encoder_spec == f"hf:{CLIP_ID}"
    first = read_manifest(root.prepared, "test").images[0]
    image = cli.read_image(_image_path(cfg, root, first))
    with FeatureCache(features_file(root.features, "test")) as features:  # as extraction encoded it
        cached = torch.from_numpy(features.tokens([first.image_id]))
    expected = bridge.module(cached.float())
    assert torch.allclose(bridge.prefixes([image]), expected, atol=1e-3)
    # this machine's spec for the encoder is used where it names the recorded one; another is not
    assert Bridge.load(folder, "cpu", local_encoder=f"hf:{snapshot}").encoder_spec == f"hf:{snapshot}"
    assert encoder_to_load(f"hf:{CLIP_ID}", "efficientnet-lite0") == f"hf:{CLIP_ID}"
    # a local folder's record is a name: loading says so in one line, and takes the folder when given
    local = shutil.copytree(snapshot, tmp_path / "models" / "clip")
    for recorded, said in (("hf-folder:clip", "the local transformers folder 'clip'"),
                           ("hf", "names its encoder only as 'hf'")):
        save_bridge(tmp_path / recorded, bridge.module, bridge.config | {"encoder": recorded})
        with pytest.raises(ConfigError) as err:
            Bridge.load(tmp_path / recorded, "cpu").encoder
        (line,) = str(err.value).splitlines()
        assert said in line and bridge.config["encoder_weights_sha256"][:12] in line and "encoder='hf:" in line
        given = Bridge.load(tmp_path / recorded, "cpu", local_encoder=f"hf:{local}")
        assert torch.allclose(given.prefixes([image]), expected, atol=1e-3)
    # a recorded Hub id this machine's cache lacks: one line, or this machine's spec when there is one
    save_bridge(tmp_path / "elsewhere", bridge.module, bridge.config | {"encoder": "hf:someone/not-cached"})
    with pytest.raises(ConfigError, match=r"^encoder hf:someone/not-cached: weights not found on this machine"):
        Bridge.load(tmp_path / "elsewhere", "cpu").encoder
    given = Bridge.load(tmp_path / "elsewhere", "cpu", local_encoder=f"hf:{local}")
    assert torch.allclose(given.prefixes([image]), expected, atol=1e-3) and given.encoder_spec == f"hf:{local}"
    with pytest.raises(MismatchError, match="is not the encoder the limber bridge was trained on"):
        Bridge.load(folder, "cpu", encoder="efficientnet-lite0").encoder


def _image_path(cfg, root: Dirs, row) -> Path:
    from pipeline.manifest import resolve_image_root

    manifest = read_manifest(root.prepared, "test")
    return resolve_image_root(manifest.image_root, cfg.prepare) / row.image_path


def test_push_uploads_the_bridge_and_its_card_and_it_comes_back_through_the_cache(clip_bridge, smollm2, hub,
                                                                                  tmp_path, monkeypatch):
    import huggingface_hub.constants

    cfg, root = clip_bridge
    bridge = Bridge.load(root.models / "limber", "cpu")
    url = bridge.push_to_hub("someone/clip-bridge", token=TOKEN, endpoint=hub.url)
    (commit,) = hub.commits
    assert url == f"{hub.url}/someone/clip-bridge/commit/{commit['oid']}"
    assert commit["summary"] == "Upload VLAP bridge" and commit["keys"] == ["file", "lfsFile"]
    files = hub.repos["someone/clip-bridge"]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):  # the bridge's own bytes
        assert files[name] == (root.models / "limber" / name).read_bytes()
    card = files["README.md"].decode()
    assert f"base_model:\n- {CLIP_ID}\n" in card and 'Bridge.from_pretrained("someone/clip-bridge")' in card
    called = [(m, p) for m, p, _ in hub.requests]
    assert called[0] == ("POST", "/api/repos/create") and called[-1][1].endswith("/commit/main")
    assert ("PUT", f"/lfs/{hashlib.sha256(files['model.safetensors']).hexdigest()}") in called
    assert all(auth == f"Bearer {TOKEN}" for m, p, auth in hub.requests if not p.startswith("/lfs/"))
    # again: the repository exists (409 is fine), the weights are already stored, the card is committed again
    bridge.push_to_hub("someone/clip-bridge", token=TOKEN, endpoint=hub.url)
    assert len(hub.commits) == 2 and [m for m, _, _ in hub.requests].count("PUT") == 1
    # back from the Hub through the cache's layout, offline: the encoder loads from the id config.json records
    cache = tmp_path / "hf-cache"
    as_cache(cache, "someone/clip-bridge", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fetched = Bridge.from_pretrained("someone/clip-bridge", "cpu", cache_dir=cache)
    fetched._lm = bridge._lm = smollm2
    assert fetched.config == bridge.config and fetched.encoder_spec == f"hf:{CLIP_ID}"
    image = cli.read_image(_image_path(cfg, root, read_manifest(root.prepared, "test").images[0]))
    assert fetched.caption([image], 4) == bridge.caption([image], 4)


def test_push_by_the_default_upload_path_when_every_file_goes_in_the_commit(clip_bridge, monkeypatch):
    """huggingface_hub's own default (with hf_xet installed, its pipelined upload): files the Hub takes in the
    commit itself go there as on the LFS path (xet storage, for the others, is not served here)."""
    import huggingface_hub.constants

    _, root = clip_bridge
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = StubHub(lfs=())
    try:
        url = Bridge.load(root.models / "limber", "cpu").push_to_hub("someone/clip-bridge", token=TOKEN,
                                                                      endpoint=hub.url)
    finally:
        hub.close()
    (commit,) = hub.commits
    assert url == f"{hub.url}/someone/clip-bridge/commit/{commit['oid']}" and commit["keys"] == ["file"]
    assert hub.repos["someone/clip-bridge"]["model.safetensors"] == (root.models / "limber" /
                                                                     "model.safetensors").read_bytes()


def test_a_refused_or_offline_push_is_one_line(clip_bridge, hub, monkeypatch):
    import huggingface_hub.constants

    _, root = clip_bridge
    bridge = Bridge.load(root.models / "limber", "cpu")
    with pytest.raises(HubError) as err:
        bridge.push_to_hub("someone/clip-bridge", token="hf_wrong", endpoint=hub.url)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"push to someone/clip-bridge at {hub.url}: ") and "401" in line
    assert hub.repos == {}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 forbids reaching the Hub; unset it to upload"):
        bridge.push_to_hub("someone/clip-bridge", token=TOKEN, endpoint=hub.url)


# ---------------------------------------------------------------- the card
def study_report(cfg, path: Path, methods=("vlap", "limber"), seeds=(0, 1, 2)) -> dict:
    """study.json as vlap study writes it (vlap/study.py run_study), its metrics summarised by the study's own
    code from per-item scores: VLAP a little above limber on every primary metric."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 50, size=(len(seeds), 40))
    matrices = {metric: {m: base + 5.0 * (m == "vlap") + rng.normal(0, 1, base.shape) for m in methods}
                for metric in PRIMARY}
    report = summarise(matrices, n_boot=200)
    study = {"command": "vlap study --seeds 0 1 2", "seeds": list(seeds), "methods": list(methods), "variants": {},
             "correction": CORRECTION, "primary": list(PRIMARY), "setting": study_setting(cfg),
             "code_revision": None, "metrics": report}
    path.mkdir(parents=True, exist_ok=True)
    (path / "study.json").write_text(json.dumps(study))
    return study


def test_the_card_gives_models_data_budget_and_the_study_intervals_of_the_bridges_setting(clip_bridge, tmp_path):
    cfg, root = clip_bridge
    bridge = Bridge.load(root.models / "limber", "cpu")
    study = study_report(cfg, tmp_path / "study")
    data = {"source": cfg.prepare.source, "heldout": list(cfg.prepare.heldout)}
    folder = bridge.save_pretrained(tmp_path / "out", study=tmp_path / "study", metrics=root.metrics, data=data,
                                    repo_id="someone/clip-bridge")
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"library_name": "vlap-pipeline", "pipeline_tag": "image-to-text",
                     "tags": ["vlap", "linear-bridge", "frozen-llm", "image-captioning"], "base_model": [CLIP_ID]}
    config = bridge.config
    rows = dict(re.findall(r"^\| ([^|]+) \| (.+) \|$", card, re.M))
    assert rows["vision encoder"].startswith(f"`hf:{CLIP_ID}`: {config['feature_shape'][0]} tokens of 32; weights "
                                             f"sha256 `{config['encoder_weights_sha256'][:16]}")
    assert rows["language model"] == f"`{config['llm']}` (d_model {config['d_model']})"
    assert rows["training data"].startswith(f"`easyvqa`, train split: {config['samples']} (image, caption) pairs")
    assert all(h in rows["training data"] for h in cfg.prepare.heldout)
    assert rows["budget"].startswith(f"3 steps of batch 4 = 12 pairs seen ({12 / config['samples']:.2f} epochs); "
                                     f"lr {cfg.train.lr}")
    # each primary metric: limber's interval (the bridge's method first), vlap's, the bridge's own value, chance
    own = json.loads((root.metrics / "retrieval" / "limber.json").read_text())
    header = next(line for line in card.splitlines() if line.startswith("| metric | items |"))
    assert header == "| metric | items | limber | vlap | this bridge | chance |"
    for metric in PRIMARY:
        entry = study["metrics"][metric]
        cells = [f"{entry['methods'][m]['mean']:.2f} [{entry['methods'][m]['low']:.2f}, "
                 f"{entry['methods'][m]['high']:.2f}]" for m in ("limber", "vlap")]
        mine = (f"{own['cosine_i2t_R@1']:.2f} | {own['chance_i2t_R@1']:.2f}" if metric == "retrieval/cosine_i2t_R@1"
                else "– | –")
        assert f"| {metric} | {entry['items']} | {' | '.join(cells)} | {mine} |" in card
    assert "| metric | vlap − limber |" not in card  # differences are VLAP's, shown on a VLAP bridge's card
    # a VLAP bridge's card adds VLAP − each baseline with its adjusted p and verdict
    vlap = Bridge(bridge.module, config | {"method": "vlap"}, torch.device("cpu"))
    vlap_card = (vlap.save_pretrained(tmp_path / "vlap", study=tmp_path / "study") / "README.md").read_text()
    d = study["metrics"]["caption/CIDEr"]["vlap_minus"]["limber"]
    assert (f"| caption/CIDEr | {d['mean']:+.2f} [{d['low']:.2f}, {d['high']:.2f}], adj. p {d['p_adjusted']:.2g}, "
            f"{'**real**' if d['real'] else 'noise'} |") in vlap_card
    assert "`easyvqa`, train split" in vlap_card  # the study's setting names the data when no data is given


def test_a_study_of_another_setting_or_method_writes_nothing(clip_bridge, tmp_path):
    cfg, root = clip_bridge
    bridge = Bridge.load(root.models / "limber", "cpu")
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=40))
    study_report(other, tmp_path / "longer")
    with pytest.raises(MismatchError) as err:
        bridge.save_pretrained(tmp_path / "out", study=tmp_path / "longer" / "study.json")
    (line,) = str(err.value).splitlines()
    assert line.endswith("the study is of another setting than this bridge: steps 40 (this bridge: 3)")
    study_report(cfg, tmp_path / "vlap-only", methods=("vlap",))
    with pytest.raises(MismatchError, match="the study has no limber runs"):
        bridge.save_pretrained(tmp_path / "out", study=tmp_path / "vlap-only")
    assert not (tmp_path / "out").exists()


def test_vlap_push_sends_the_data_roots_bridge_and_says_bad_input_in_one_line(clip_bridge, tiny_pipeline, hub,
                                                                             tmp_path, capsys, monkeypatch):
    cfg, root = clip_bridge
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(as_dict(cfg)))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    argv = ["push", "someone/clip-bridge", "--method", "limber", "--params", str(params), "--data", str(root.root),
            "--endpoint", hub.url]
    assert cli.main(argv) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == f"{hub.url}/someone/clip-bridge/commit/{hub.commits[-1]['oid']}"
    card = hub.repos["someone/clip-bridge"]["README.md"].decode()
    assert "| retrieval/cosine_i2t_R@1 |" in card and f"`{cfg.prepare.source}`, train split" in card
    assert cli.main(argv[:-2] + ["--save-to", str(tmp_path / "saved")]) == 0
    assert (tmp_path / "saved" / "README.md").read_text() == card and len(hub.commits) == 1
    # a data root whose training features are not the bridge's, a bad repo id: one line each, exit 2
    other = tiny_pipeline[1].sharing_inputs(tmp_path / "other")
    shutil.copytree(root.models / "limber", other.models / "limber")
    capsys.readouterr()
    assert cli.main(argv[:6] + ["--data", str(other.root), "--save-to", str(tmp_path / "x")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {other.models / 'limber'}: trained on other training features than")
    assert cli.main(["push", "not a repo", "--save-to", str(tmp_path / "x")]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1 and not (tmp_path / "x").exists()


def test_python_m_vlap_help_lists_push():
    proc = subprocess.run([sys.executable, "-m", "vlap", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "push" in proc.stdout and proc.stderr == ""
