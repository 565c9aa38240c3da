"""Small datasets the tests draw and write in each layout the README documents (folder + captions.csv,
webdataset shards, Karpathy's split JSON, CC3M's TSV + img2dataset files, NoCaps, VQAv2), and the one set
of cost keys that shrinks a run of the committed params.yaml to a test's size without changing what runs."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from shard_writer import write_shard

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, rgb: tuple, jitter: int) -> Image.Image:
    img = Image.new("RGB", (48, 48), (235, 235, 235))
    d, box = ImageDraw.Draw(img), (8 + jitter, 8, 40 - jitter, 40)
    {"circle": lambda: d.ellipse(box, fill=rgb), "square": lambda: d.rectangle(box, fill=rgb),
     "triangle": lambda: d.polygon([(24, 6 + jitter), (42, 42), (6, 42)], fill=rgb)}[shape]()
    return img


def pictures(per_pair: int, start: int = 0) -> list[tuple[str, Image.Image, str]]:
    """(name, image, caption) for every colour x shape, `per_pair` distinct drawings of each."""
    return [(f"{colour}_{shape}_{k}", draw(shape, rgb, k), f"a {colour} {shape}")
            for colour, rgb in COLOURS.items() for shape in SHAPES for k in range(start, start + per_pair)]


def write_folder_dataset(folder: Path) -> int:
    """36 PNGs (3 colours x 3 shapes x 4), captions.csv with a split column (1 in 4 is test)."""
    folder.mkdir(parents=True)
    rows = ["image,caption,split"]
    for name, image, caption in pictures(4):
        image.save(folder / f"{name}.png")
        rows.append(f"{name}.png,{caption},{'test' if name.endswith('_3') else 'train'}")
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return len(rows) - 1


def write_webdataset(folder: Path) -> int:
    """The same 36 pictures as 3 tar shards in img2dataset's layout (captions in .txt or .json)."""
    samples = [(f"{k:09d}", image, caption, ("txt", "json", "both")[k % 3])
               for k, (_, image, caption) in enumerate(pictures(4))]
    for s in range(3):
        write_shard(folder / f"{s:05d}.tar", samples[12 * s: 12 * (s + 1)])
    return len(samples)


def write_karpathy(root: Path) -> tuple[Path, Path, int]:
    """COCO in Karpathy's layout: <root>/coco/{train2014,val2014}/*.jpg and dataset_coco.json with train,
    restval, val and test entries (two sentences each). Returns (image root, split file, images)."""
    images, entries = root / "coco", []
    splits = ("train", "train", "restval", "val", "test")  # by drawing index
    for i, (name, image, caption) in enumerate(pictures(5)):
        k = int(name.rsplit("_", 1)[1])
        sub = "train2014" if splits[k] in ("train", "restval") else "val2014"
        (images / sub).mkdir(parents=True, exist_ok=True)
        image.save(images / sub / f"COCO_{sub}_{i:012d}.jpg", quality=95)
        entries.append({"filepath": sub, "filename": f"COCO_{sub}_{i:012d}.jpg", "imgid": i, "cocoid": i,
                        "split": splits[k], "sentids": [2 * i, 2 * i + 1],
                        "sentences": [{"raw": caption.capitalize() + ".", "tokens": caption.split(), "imgid": i,
                                       "sentid": 2 * i},
                                      {"raw": f"there is {caption}", "tokens": ["there", "is", *caption.split()],
                                       "imgid": i, "sentid": 2 * i + 1}]})
    split_file = images / "dataset_coco.json"
    split_file.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return images, split_file, len(entries)


def write_cc3m(root: Path) -> tuple[Path, Path, int]:
    """CC3M's TSV (no header, caption<TAB>url) and img2dataset's `files` output beside it: <shard>/<key>.jpg
    with its .txt and .json sidecars. Returns (image folder, TSV, images)."""
    folder, rows = root / "cc3m" / "images", []
    for k, (name, image, caption) in enumerate(pictures(3)):
        url, shard, key = f"http://img.example/{name}.jpg", f"{k // 16:05d}", f"{k:09d}"
        rows.append(f"{caption}\t{url}")
        (folder / shard).mkdir(parents=True, exist_ok=True)
        image.save(folder / shard / f"{key}.jpg", quality=95)
        (folder / shard / f"{key}.txt").write_text(caption)
        (folder / shard / f"{key}.json").write_text(json.dumps({"url": url, "key": key, "status": "success",
                                                                "caption": caption, "width": 48, "height": 48}))
    tsv = root / "cc3m" / "Train_GCC-training.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    return folder, tsv, len(rows)


NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def write_nocaps(root: Path) -> tuple[Path, Path, int]:
    """NoCaps validation: nocaps_val_4500_captions.json (COCO-style, each image with its domain) + images,
    drawings training never saw. Returns (image folder, captions JSON, images)."""
    folder, images, annotations = root / "nocaps" / "val", [], []
    for i, (_, image, caption) in enumerate(pictures(1, start=5)):
        name = f"{i:016x}.jpg"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / name, quality=95)
        images.append({"id": i, "open_images_id": f"{i:016x}", "file_name": name, "height": 48, "width": 48,
                       "domain": NOCAPS_DOMAINS[i % 3], "coco_url": f"https://s3.amazonaws.com/nocaps/val/{name}"})
        annotations += [{"image_id": i, "id": 10 * i + k, "caption": text}
                        for k, text in enumerate((caption, f"{caption} on grey"))]
    path = root / "nocaps" / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps({"licenses": [], "info": {"description": "nocaps validation dataset"},
                                "images": images, "annotations": annotations}))
    return folder, path, len(images)


def write_vqav2(root: Path) -> tuple[Path, Path, Path, int]:
    """VQAv2 val: COCO val2014 images, the questions JSON and the annotations JSON (ten answers a question).
    Returns (the COCO root holding val2014/, questions, annotations, images)."""
    folder, questions, annotations = root / "vqav2" / "val2014", [], []
    for i, (_, image, caption) in enumerate(pictures(1, start=6)):
        colour, shape = caption.split()[1:]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"COCO_val2014_{i:012d}.jpg", quality=95)
        for k, (text, answer, qtype, atype) in enumerate(((f"What color is the {shape}?", colour,
                                                            "what color is the", "other"),
                                                           ("Is there a circle?", "yes" if shape == "circle" else "no",
                                                            "is there a", "yes/no"))):
            qid = 10 * i + k
            questions.append({"image_id": i, "question": text, "question_id": qid})
            annotations.append({"image_id": i, "question_id": qid, "question_type": qtype, "answer_type": atype,
                                "multiple_choice_answer": answer,
                                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": a + 1}
                                            for a in range(10)]})
    common = {"info": {}, "license": {}, "data_subtype": "val2014"}
    q_path, a_path = root / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json", \
        root / "vqav2" / "v2_mscoco_val2014_annotations.json"
    q_path.write_text(json.dumps(common | {"task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
    a_path.write_text(json.dumps(common | {"data_type": "mscoco", "annotations": annotations}))
    return folder.parent, q_path, a_path, len(list(folder.iterdir()))  # the COCO root, holding val2014/


def shrink_cost(params: dict, clip: Path, opt: Path) -> dict:
    """The committed params at a test's cost: tiny local models, 3 training steps, short decodes, every test
    image. Only sizes and model paths change: every stage, task and code path the recipe reaches still runs."""
    params["extract"] |= {"encoder": f"hf:{clip}", "batch_size": 16}
    params["prototypes"] |= {"llm": f"hf:{opt}"}
    params["train"] |= {"steps": 3, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 3}
    params["evaluate"]["common"] |= {"test_images": 0, "batch_size": 8}
    params["evaluate"]["caption"] |= {"max_new_tokens": 3, "examples": 2}
    params["evaluate"]["arithmetic"] |= {"queries": 0, "examples": 1}
    return params
