"""A trained bridge on the Hugging Face Hub: fetched into (or read offline from) the local Hugging Face cache,
written with a model card, and uploaded.

A bridge on the Hub is a model repository holding the bridge folder's files (model.safetensors,
config.json) and a README.md model card. Nothing here runs unless asked: the pipeline itself never reaches
the Hub (HF_HUB_OFFLINE=1 reads only what the cache holds).
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.bridge import CONFIG, WEIGHTS
from pipeline.errors import CacheError, ConfigError, MismatchError, MissingInputError, UserError
from pipeline.model_ids import HUB_ID, LEGACY_HF, LOCAL_FOLDER, hub_id, locatable, model_id

CARD = "README.md"


class HubError(UserError):
    """The Hub refused an upload or could not be reached; one line says which and why."""


def unlocated_encoder(config: dict) -> str:
    """One line: the bridge's encoder cannot be loaded from what config.json records, and what to pass."""
    recorded, sha = config.get("encoder", ""), str(config.get("encoder_weights_sha256", ""))[:12]
    if recorded == LEGACY_HF:
        what = ("config.json names its encoder only as 'hf' (a transformers model, extracted before feature files "
                "recorded its id)")
    else:
        what = (f"its encoder was the local transformers folder {recorded.removeprefix(LOCAL_FOLDER)!r}, which "
                "config.json names but cannot locate")
    return (f"{what}: pass encoder='hf:<hub id or folder>' whose weights sha256 starts {sha} "
            "(the CLI: extract.encoder in params.yaml)")


# ---------------------------------------------------------------- fetching
def hub_folder(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of a Hub bridge repository's files (downloaded when online and not cached); a repo
    that cannot be had is one line naming it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=[WEIGHTS, CONFIG, CARD]))
    except LocalEntryNotFoundError:
        raise MissingInputError(f"{repo_id}: not a bridge folder here, and not in the local Hugging Face cache "
                                "(offline: HF_HUB_OFFLINE=1 reads only the cache; download it once online)") from None
    except (HfHubHTTPError, ValueError) as err:
        raise MissingInputError(f"{repo_id}: no bridge on the Hugging Face Hub "
                                f"({type(err).__name__}: {str(err).splitlines()[0]})") from None


# ---------------------------------------------------------------- what the card reports
def read_study(path: str | Path) -> dict:
    """A `vlap study` report (its study.json, or the folder holding it)."""
    path = Path(path)
    path = path / "study.json" if path.is_dir() else path
    if not path.is_file():
        raise MissingInputError(f"{path}: no study report (vlap study writes <out>/study.json)")
    try:
        study = json.loads(path.read_text())
    except ValueError as err:
        raise CacheError(f"{path}: not a readable study report ({err})") from None
    if not isinstance(study, dict) or not isinstance(study.get("metrics"), dict):
        raise CacheError(f"{path}: not a study report (no metrics; vlap study writes it)")
    return study | {"path": str(path)}


def read_metrics(metrics_dir: str | Path, method: str) -> dict[str, dict]:
    """task/metric -> {"value", "chance"} of the bridge's own evaluation (metrics/<task>/<method>.json) for each
    task's primary metric; tasks not evaluated, or not applicable to the test data, are left out."""
    from pipeline.tasks.registry import TASKS

    found = {}
    for name, task in TASKS.items():
        path = Path(metrics_dir) / name / f"{method}.json"
        if not path.is_file():
            continue
        try:
            metrics = json.loads(path.read_text())
        except ValueError as err:
            raise CacheError(f"{path}: not a readable metrics file ({err}); evaluate again") from None
        if metrics.get("applicable") is False or task.primary not in metrics:
            continue
        chance = task.chance_key(task.primary)
        found[f"{name}/{task.primary}"] = {"value": metrics[task.primary], "chance": metrics.get(chance)}
    return found


def bridge_setting(config: dict, data: dict | None = None) -> dict:
    """What a study's numbers belong to (pipeline.tasks.summary.study_setting), as far as a bridge knows it."""
    train = config.get("train", {})
    return {"encoder": config.get("encoder"), "llm": model_id(str(config.get("llm", ""))),
            "steps": train.get("steps"), "epochs": train.get("epochs"), "batch_size": train.get("batch_size"),
            **{k: v for k, v in (data or {}).items() if k in ("source", "test_source", "heldout")}}


def check_study(study: dict, config: dict, data: dict | None = None) -> None:
    """A study may speak for a bridge only when it trained the bridge's method at the bridge's setting."""
    path, method = study.get("path", "study.json"), config.get("method")
    if method not in study.get("methods", []):
        raise MismatchError(f"{path}: the study has no {method} runs (methods: {', '.join(study.get('methods', []))})")
    recorded = study.get("setting")
    if not isinstance(recorded, dict):
        raise MismatchError(f"{path}: the study records no setting (data, models, budget); re-run vlap study")
    recorded = recorded | {k: model_id(str(recorded[k])) for k in ("encoder", "llm") if k in recorded}
    ours = bridge_setting(config, data)
    if ours["encoder"] == LEGACY_HF and str(recorded.get("encoder")).startswith(("hf:", LOCAL_FOLDER)):
        ours["encoder"] = recorded["encoder"]  # an older bridge names no transformers encoder: its weights decide
    differs = [f"{k} {recorded.get(k)!r} (this bridge: {v!r})" for k, v in ours.items()
               if k in recorded and _comparable(recorded[k]) != _comparable(v)]
    if differs:
        raise MismatchError(f"{path}: the study is of another setting than this bridge: {'; '.join(differs)}")


def _comparable(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- the card
def model_card(config: dict, study: dict | None = None, metrics: dict[str, dict] | None = None,
               data: dict | None = None, repo_id: str | None = None) -> str:
    """README.md for the Hub: metadata (front matter) and what the bridge is, what it was trained on and for how
    long, how it scored (a `study`'s intervals over seeds and test items, and/or its own evaluation's `metrics`,
    read_metrics) and how to use it. `data`: the training data's source and held-out pairs (params' prepare)."""
    if study is not None:
        check_study(study, config, data)
        data = data or {k: study["setting"][k] for k in ("source", "test_source", "heldout") if k in study["setting"]}
    train, final, method = config.get("train", {}), config.get("final", {}), config.get("method")
    encoder, llm = str(config.get("encoder", "")), model_id(str(config.get("llm", "")))
    front = {"library_name": "vlap-pipeline", "pipeline_tag": "image-to-text",
             "tags": ["vlap", "linear-bridge", "frozen-llm", "image-captioning"]}
    bases = [b for b in (hub_id(encoder), hub_id(llm)) if b]
    if bases:
        front["base_model"] = bases
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items()) if isinstance(v, float) and k != "lr")
    steps, batch, samples = config.get("steps"), train.get("batch_size"), config.get("samples")
    seen = (f" = {steps * batch} pairs seen ({steps * batch / samples:.2f} epochs)" if steps and batch and samples
            else "")
    n_tokens = config.get("feature_shape", ["?", "?"])[0]
    sha = str(config.get("encoder_weights_sha256", ""))
    body = [
        f"# VLAP bridge ({method}): {encoder} → {llm}", "",
        "A single linear layer that maps a frozen vision encoder's tokens into a frozen language model's "
        "input-embedding space (VLAP, ICLR 2024: assignment prediction with optimal transport, plus captioning). "
        f"Trained with method `{method}` by vlap-pipeline.", "",
        "| | |", "| --- | --- |",
        f"| vision encoder | `{encoder}`: {n_tokens} tokens of {config.get('d_vision')}; weights sha256 "
        f"`{sha[:16]}…` |",
        f"| language model | `{llm}` (d_model {config.get('d_model')}) |",
        f"| training data | {_training_data(data, samples)} |",
        f"| budget | {steps} steps of batch {batch}{seen}; lr {train.get('lr')}, {train.get('schedule', 'cosine')} "
        f"schedule, {config.get('warmup_steps', 0)} warm-up steps; precision {config.get('precision')}; "
        f"seed {train.get('seed')} |",
        f"| prompt | `{config.get('prompt')}` |",
        f"| method settings | `{json.dumps(config.get('method_config', {}), sort_keys=True)}` |",
        f"| last step's losses | {losses or '–'} |", ""]
    body += _evaluation(method, study, metrics or {}, train.get("seed"))
    body += _use(encoder, sha, repo_id)
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body)


def _training_data(data: dict | None, samples) -> str:
    pairs = f"{samples} (image, caption) pairs"
    if not data or not data.get("source"):
        return f"{pairs} (source not given)"
    held = (f"; colour–shape pairs held out of training (the zero-shot test): {', '.join(data['heldout'])}"
            if data.get("heldout") else "")
    tested = f"; tested on {data['test_source']}" if data.get("test_source") else ""
    return f"`{data['source']}`, train split: {pairs}{held}{tested}"


def _evaluation(method: str, study: dict | None, metrics: dict[str, dict], seed) -> list[str]:
    from pipeline.tasks.registry import PRIMARY

    if study is None and not metrics:
        return []
    lines = ["## Evaluation", ""]
    if study is None:
        lines += ["This bridge's own evaluation on the test split: one training, so no interval (`vlap study` "
                  "trains each method with several seeds and gives 95% intervals). The primary metric of each "
                  "task.", "", "| metric | this bridge | chance |", "| --- | ---: | ---: |"]
        for metric in (m for m in PRIMARY if m in metrics):
            lines.append(f"| {metric} | {_number(metrics[metric]['value'])} | {_number(metrics[metric]['chance'])} |")
        return lines + [""]
    primary = [m for m in study.get("primary", PRIMARY) if m in study["metrics"]]
    methods = [method] + [m for m in study.get("methods", []) if m != method]
    own = " | this bridge | chance" if metrics else ""
    lines += [f"From `{study.get('command', 'vlap study')}`: seeds {study.get('seeds')} of each method at this "
              "bridge's setting (data, models, budget), every method and seed scored on the same test items. Each "
              "cell: mean [95% interval], bootstrap over seeds and test items; the primary metric of each task. "
              f"This bridge is one training at that setting (seed {seed})"
              + ("; *this bridge*: its own evaluation, *chance*: a random caption, answer or ranking." if metrics
                 else "."), "",
              "| metric | items | " + " | ".join(methods) + own + " |",
              "| --- | ---: |" + " ---: |" * (len(methods) + 2 * bool(metrics))]
    for metric in primary:
        entry = study["metrics"][metric]
        cells = [_interval(entry["methods"][m]) if m in entry["methods"] else "–" for m in methods]
        if metrics:
            mine = metrics.get(metric, {})
            cells += [_number(mine.get("value")), _number(mine.get("chance"))]
        lines.append(f"| {metric} | {entry.get('items', '–')} | " + " | ".join(cells) + " |")
    diffs = {m: study["metrics"][m].get("vlap_minus", {}) for m in primary}
    bases = [b for b in study.get("methods", []) if any(b in d for d in diffs.values())]
    if method == "vlap" and bases:
        corrected = any("p_adjusted" in d for by in diffs.values() for d in by.values())
        note = (f"p adjusted for multiplicity ({study['correction']}); *real*: adjusted p < 0.05"
                if corrected and study.get("correction") else "not corrected for multiplicity")
        lines += ["", f"VLAP − each baseline, paired over seeds and items: mean [95% interval]; {note}.", "",
                  "| metric | " + " | ".join(f"vlap − {b}" for b in bases) + " |", "| --- |" + " ---: |" * len(bases)]
        for metric in primary:
            cells = []
            for b in bases:
                d = diffs[metric].get(b)
                verdict = (f", adj. p {d['p_adjusted']:.2g}, {'**real**' if d.get('real') else 'noise'}"
                           if d and "p_adjusted" in d else "")
                cells.append("–" if d is None else _interval(d, sign=True) + verdict)
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines + [""]


def _number(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _interval(i: dict, sign: bool = False) -> str:
    return f"{i['mean']:{'+' if sign else ''}.2f} [{i['low']:.2f}, {i['high']:.2f}]"


def _use(encoder: str, sha: str, repo_id: str | None) -> list[str]:
    name = repo_id or "<this repo id>"
    if locatable(encoder):
        how = (f"The encoder (`{encoder}`) and the language model load from the ids above on first use (a Hub id "
               "from the local Hugging Face cache).")
        load = f'bridge = Bridge.from_pretrained("{name}")'
    else:
        how = ("The encoder was a local transformers folder, which config.json names but cannot locate: pass it "
               f"(`encoder=\"hf:<folder>\"`; its weights sha256 must be `{sha[:16]}…`).")
        load = f'bridge = Bridge.from_pretrained("{name}", encoder="hf:<folder>")'
    return ["## Use", "", "With vlap-pipeline installed:", "", "```python", "from PIL import Image",
            "from pipeline.api import Bridge", "", load,
            'bridge.caption([Image.open("image.png")])', "```", "",
            how + " `config.json` holds every training setting.", ""]


# ---------------------------------------------------------------- uploading
def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload VLAP bridge", endpoint: str | None = None) -> str:
    """Upload a bridge folder (with its model card) to a Hub model repository, created if needed; the commit's
    URL. `endpoint`: another Hub than huggingface.co (default: HF_ENDPOINT, else huggingface.co). A refusal
    or an unreachable Hub is one line (HubError)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=endpoint, token=token)
    # HfHubHTTPError derives from its HTTP client's base error, which the client's transport errors share
    client_errors = tuple(c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                                 allow_patterns=[WEIGHTS, CONFIG, CARD])
    except OfflineModeIsEnabled:
        raise HubError(f"push to {repo_id}: HF_HUB_OFFLINE=1 forbids reaching the Hub; unset it to upload") from None
    except (*client_errors, OSError, ValueError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise HubError(f"push to {repo_id} at {api.endpoint}: {reason}") from None
    return str(getattr(info, "commit_url", info))


def check_repo_id(repo_id: str) -> str:
    """`owner/name` as the Hub spells it, or one line saying what is wrong."""
    if not HUB_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ConfigError(f"{repo_id!r}: not a Hub repo id (expected owner/name: letters, digits, '-', '_', '.')")
    return repo_id
