"""``toile caption IMAGE...``: describe images in words; ``--write-txt`` writes kohya-style
``NAME.txt`` captions beside them, the form every trainer (toile's finetune too) reads."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.cli.task_options import add_model_options, engine_for
from toile.errors import RequestError

if TYPE_CHECKING:
    from toile.engine.engine import Engine


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "caption",
        help="caption images (a folder or files)",
        description="Caption each image with a reader model (BLIP, BLIP-2, a vision-language "
        "model; greedy decoding, so a caption is reproducible). Prints one caption per image "
        "(PATH<TAB>CAPTION; a single image: the caption alone). Folders are read with their "
        "subfolders, as toile finetune reads them (.png .jpg .jpeg .webp .bmp).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of them")
    p.add_argument("--long", action="store_true", help="a longer description (default: one "
                   "sentence)")
    p.add_argument("--write-txt", action="store_true",
                   help="write NAME.txt beside each image (kohya-style), skipping images that "
                   "already have one")
    p.add_argument("--overwrite", action="store_true",
                   help="with --write-txt: replace existing NAME.txt captions")
    add_model_options(p, "caption")
    p.set_defaults(run=run)


def image_paths(sources: list[str]) -> list[Path]:
    """Image files named, and the images directly inside folders named, in order."""
    from toile.data.folders import IMAGE_SUFFIXES, iter_image_files

    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():  # the walk fine-tuning uses, so both see the same images
            found += list(iter_image_files(path))
        elif path.is_file():
            found.append(path)
        else:
            raise RequestError("image", f"{source} does not exist")
    if not found:
        raise RequestError("image", f"no images found in {', '.join(sources)} (looked for "
                           f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


@dataclass(frozen=True)
class Captioned:
    path: Path
    caption: str | None  # None: skipped (it already had a caption file)
    record: dict[str, Any] | None = None


def caption_files(engine: Engine, model: str | None, paths: list[Path], *, long: bool = False,
                  write_txt: bool = False, overwrite: bool = False,
                  progress: bool = True) -> Iterator[Captioned]:
    """Caption ``paths`` one by one (a bar on stderr for several); with ``write_txt`` each
    caption goes to ``NAME.txt`` beside its image, existing ones kept unless ``overwrite``."""
    from tqdm import tqdm

    from toile.io.images import load_rgb
    from toile.request import Detail, GenerationRequest, Task

    bar = tqdm(total=len(paths), desc="caption", unit="image", file=sys.stderr,
               disable=not progress or len(paths) < 2)
    try:
        for path in paths:
            txt = path.with_suffix(".txt")
            if write_txt and txt.exists() and not overwrite:
                bar.update(1)
                yield Captioned(path, None)
                continue
            request = GenerationRequest(
                prompt="", task=Task.CAPTION, model=model, image=load_rgb(str(path)),
                detail=Detail.LONG if long else Detail.SHORT)
            result = engine.run(request)
            caption = result.texts[0]
            if write_txt:
                txt.write_text(caption + "\n")
            bar.update(1)
            yield Captioned(path, caption, result.records[0].to_dict())
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    if args.overwrite and not args.write_txt:
        raise RequestError("overwrite", "only applies with --write-txt")
    paths = image_paths(args.images)
    engine = engine_for(args)
    rows = []
    for item in caption_files(engine, args.model, paths, long=args.long,
                              write_txt=args.write_txt, overwrite=args.overwrite):
        if args.json:
            rows.append({"path": str(item.path), "caption": item.caption,
                         "skipped": item.caption is None, "record": item.record})
        elif item.caption is None:
            print(f"{item.path}\t(skipped: {item.path.with_suffix('.txt').name} exists)")
        elif len(paths) == 1:
            print(item.caption)
        else:
            print(f"{item.path}\t{item.caption}", flush=True)
    if args.json:
        print(json.dumps({"captions": rows}))
    return 0
