#!/usr/bin/env python3
"""Contact sheet of a gate's mistakes: the false passes (negatives scored >= threshold) and the false
rejections (cetaceans scored < threshold), as one JPEG, so people can look before they trust a number.

Input: the pooled out-of-fold scores that tools/train_gate.py writes with `--scores FILE.npz` (one
array of [N, 7] probabilities per variant, plus `paths`, `cats`, `datasets`). Each thumbnail is
captioned with its category, P(cetacean) and, for a 7-class variant, what the gate saw instead
(its most probable other category). Worst first (highest-scoring negatives, lowest-scoring cetaceans).

The sheet shows third-party development photos: write it outside the repository.

Usage:
  python3 tools/contact_sheet.py --scores /tmp/scores.npz --variant ft_b15 --threshold 0.2 \
      --out /tmp/gate-mistakes.jpg [--dataset marine-dev] [--max 120]
"""
import argparse

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ["cetacean", "shark", "pinniped", "seabird", "boat", "ocean", "other_marine"]
THUMB = 150
CAPTION = 28


def thumb(path, caption, colour):
    tile = Image.new("RGB", (THUMB, THUMB + CAPTION), "white")
    try:
        img = Image.open(path).convert("RGB")
        img.thumbnail((THUMB, THUMB))
        tile.paste(img, ((THUMB - img.size[0]) // 2, (THUMB - img.size[1]) // 2))
    except OSError as e:
        caption = f"unreadable: {e}"[:40]
    d = ImageDraw.Draw(tile)
    d.rectangle([0, THUMB, THUMB - 1, THUMB + CAPTION - 1], fill=colour)
    for i, line in enumerate(caption.split("\n")[:2]):
        d.text((3, THUMB + 2 + 12 * i), line, fill="white")
    return tile


def section(title, tiles, cols):
    rows = max(1, (len(tiles) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * THUMB, 24 + rows * (THUMB + CAPTION)), "white")
    d = ImageDraw.Draw(sheet)
    d.text((4, 6), title, fill="black")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * THUMB, 24 + (i // cols) * (THUMB + CAPTION)))
    return sheet


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scores", required=True)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--threshold", type=float, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dataset", default="", help="only this data set (e.g. marine-dev); default all")
    ap.add_argument("--max", type=int, default=120, help="most thumbnails per section")
    ap.add_argument("--cols", type=int, default=10)
    args = ap.parse_args()

    z = np.load(args.scores)
    probs = z[args.variant.replace("+", "_")]
    paths, cats, datasets = z["paths"], z["cats"], z["datasets"]
    score = probs[:, 0]
    multi = not np.isnan(probs[:, 1:]).any()
    keep = np.ones(len(paths), bool) if not args.dataset else datasets == args.dataset
    pos = cats == "cetacean"
    fp = np.where(keep & ~pos & (score >= args.threshold))[0]
    fn = np.where(keep & pos & (score < args.threshold))[0]
    fp = fp[np.argsort(-score[fp])][: args.max]
    fn = fn[np.argsort(score[fn])][: args.max]

    def caption(i):
        text = f"{cats[i]}  P(cet) {score[i]:.3f}"
        if multi:
            other = 1 + int(np.argmax(probs[i, 1:]))
            text += f"\nsaw {CATEGORIES[other]} {probs[i, other]:.2f}"
        return text

    a = section(f"False passes ({len(fp)} shown): negatives with P(cetacean) >= {args.threshold} "
                f"[{args.variant}, pooled grouped out-of-fold]",
                [thumb(paths[i], caption(i), (180, 40, 40)) for i in fp], args.cols)
    b = section(f"False rejections ({len(fn)} shown): cetaceans with P(cetacean) < {args.threshold}",
                [thumb(paths[i], caption(i), (40, 80, 160)) for i in fn], args.cols)
    sheet = Image.new("RGB", (max(a.size[0], b.size[0]), a.size[1] + b.size[1]), "white")
    sheet.paste(a, (0, 0))
    sheet.paste(b, (0, a.size[1]))
    sheet.save(args.out, quality=85)
    print(f"{args.out}: {len(fp)} false passes, {len(fn)} false rejections shown")


if __name__ == "__main__":
    main()
