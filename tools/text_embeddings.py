#!/usr/bin/env python3
"""Encode zero-shot prompts into the `text_embeddings.npy` of a whaled `role = "zero_shot"` model.

  python3 tools/text_embeddings.py --text-encoder text_encoder.onnx --tokenizer tokenizer.json \\
      --prompts prompts.txt --out text_embeddings.npy [--context 77] [--normalize]

`prompts.txt` holds one prompt per line (blank lines and lines starting with `#` are skipped), the
POSITIVE prompts first: the manifest's `[zero_shot] positives = N` counts the first N rows as positive.
The output is float32, C order, shape [prompts, dim], the text encoder's output as is (NOT normalised;
whaled and tools/zeroshot_ref.py L2-normalise every row themselves). `--normalize` writes unit rows
instead; either gives the same scores. The tool prints the file's SHA-256 and a `[zero_shot]` manifest
snippet.

Tokenisation uses the Hugging Face `tokenizers` library (no torch): the tokenizer.json's own
post-processor adds the start/end tokens (CLIP's does); the ids are then padded to the context length
with the pad id (the tokenizer.json's padding id if it configures one, else 0, which is what open_clip
pads with; `--pad-id` overrides) or cut to it (the last id, CLIP's end token, is kept at the last
position, as open_clip's tokenizer does).

The text encoder ONNX must take the token ids as an integer input [N, context] named `input_ids`,
`text`, `tokens`, `ids` or `input` (any name if it is the graph's only input) and may take an
`attention_mask` [N, context] (1 for real tokens, 0 for padding), which is then given. Its output is
`--output NAME`, else `text_embeds`, else the only output shaped [N, dim]. A fixed batch of 1 is run a
prompt at a time; a fixed context length must equal `--context`.

Getting a real CLIP text encoder (none is reachable from this development box: no network, no CLIP
weights here; CI uses the random-weight encoder that tools/gen_test_models.py generates). On a machine
with torch and the weights:
  * Hugging Face: `optimum-cli export onnx --model openai/clip-vit-base-patch32 --task feature-extraction
    clip_onnx/` exports the joint model (not usable here: it also wants pixel_values); for the text tower
    alone, export
    `transformers.CLIPTextModelWithProjection` with `torch.onnx.export(model, (input_ids, attention_mask),
    "text_encoder.onnx", input_names=["input_ids", "attention_mask"], output_names=["text_embeds"],
    dynamic_axes={"input_ids": {0: "N"}, "attention_mask": {0: "N"}, "text_embeds": {0: "N"}})`.
    The repository's `tokenizer.json` is the tokenizer.
  * open_clip (upstream uses ViT-B-32 laion2b_s34b_b79k): wrap `model.encode_text` in a torch.nn.Module
    and `torch.onnx.export(wrapper, open_clip.tokenize(["x"]), "text_encoder.onnx",
    input_names=["input_ids"], output_names=["text_embeds"], dynamic_axes={"input_ids": {0: "N"},
    "text_embeds": {0: "N"}})`; open_clip's BPE matches openai/clip-vit-base-patch32's tokenizer.json
    (pad id 0, context 77). Export the image tower (`model.encode_image`, input "input" [1,3,224,224],
    output "image_embeds") the same way for the manifest's `[[variants]]`.
Only the resulting text_embeddings.npy ships with the model; whaled never runs the text encoder.
"""
import argparse
import hashlib
import os
import sys

import numpy as np

ID_INPUT_NAMES = ("input_ids", "text", "tokens", "ids", "input", "token_ids")
MASK_INPUT_NAMES = ("attention_mask", "mask")
INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class ToolError(Exception):
    pass


def read_prompts(path):
    if not os.path.isfile(path):
        raise ToolError(f"prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        prompts = [ln.strip() for ln in f]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ToolError(f"no prompts in {path}")
    return prompts


def load_tokenizer(path):
    if not os.path.isfile(path):
        raise ToolError(f"tokenizer file not found: {path}")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ToolError("the `tokenizers` package is missing: pip install -r requirements-dev.txt") from e
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a plain Exception on a bad file
        raise ToolError(f"cannot read tokenizer {path}: {e}") from e


def tokenize(tokenizer, prompts, context=77, pad_id=None):
    """Token ids [len(prompts), context] int64 and the attention mask (1 = token, 0 = padding)."""
    if pad_id is None:
        pad_id = (tokenizer.padding or {}).get("pad_id", 0)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ids = np.full((len(prompts), context), pad_id, np.int64)
    mask = np.zeros((len(prompts), context), np.int64)
    for i, p in enumerate(prompts):
        t = tokenizer.encode(p).ids
        if not t:
            raise ToolError(f"prompt {i + 1} tokenises to nothing: {p!r}")
        if len(t) > context:
            print(f"warning: prompt {i + 1} has {len(t)} tokens, cut to {context}: {p!r}", file=sys.stderr)
            t = t[:context - 1] + t[-1:]
        ids[i, :len(t)] = t
        mask[i, :len(t)] = 1
    return ids, mask


def _pick_inputs(sess):
    inputs = sess.get_inputs()
    ids_in = [i for i in inputs if i.name in ID_INPUT_NAMES]
    if not ids_in and len(inputs) == 1:
        ids_in = inputs
    mask_in = [i for i in inputs if i.name in MASK_INPUT_NAMES]
    other = [i.name for i in inputs if i not in ids_in and i not in mask_in]
    if len(ids_in) != 1 or other:
        raise ToolError("the text encoder's inputs are " + ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
                        + f"; expected one token-id input named one of {ID_INPUT_NAMES} and optionally "
                          f"{MASK_INPUT_NAMES[0]}" + (f" (do not understand: {other})" if other else ""))
    for i in ids_in + mask_in:
        if i.type not in INT_TYPES:
            raise ToolError(f"input {i.name} is {i.type}; expected int64 or int32 token ids / mask")
        if len(i.shape) != 2:
            raise ToolError(f"input {i.name} has shape {i.shape}; expected [batch, context]")
    return ids_in[0], (mask_in[0] if mask_in else None)


def _pick_output(sess, name):
    outs = sess.get_outputs()
    names = [o.name for o in outs]
    if name:
        if name not in names:
            raise ToolError(f"the text encoder has no output {name!r} (outputs: {names})")
        return name
    if "text_embeds" in names:
        return "text_embeds"
    two_d = [o.name for o in outs if len(o.shape) == 2]
    if len(two_d) == 1:
        return two_d[0]
    raise ToolError(f"cannot tell which output is the text embedding (outputs: "
                    + ", ".join(f"{o.name} {o.shape}" for o in outs) + "); pass --output NAME")


def encode_prompts(text_encoder, tokenizer_path, prompts, context=77, pad_id=None, output=None,
                   normalize=False, threads=1):
    """Run the ONNX text encoder over `prompts`; returns float32 [len(prompts), dim], C order."""
    if not os.path.isfile(text_encoder):
        raise ToolError(f"text encoder not found: {text_encoder}")
    import onnxruntime as ort
    tok = load_tokenizer(tokenizer_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(text_encoder, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ToolError(f"onnxruntime cannot load {text_encoder}: {e}") from e
    ids_in, mask_in = _pick_inputs(sess)
    out_name = _pick_output(sess, output)
    batch, ctx = ids_in.shape
    if isinstance(ctx, int) and ctx != context:
        raise ToolError(f"the text encoder's {ids_in.name} has a fixed context of {ctx}, not {context}; "
                        f"pass --context {ctx}")
    ids, mask = tokenize(tok, prompts, context, pad_id)
    rows = [slice(0, len(prompts))] if not (isinstance(batch, int) and batch == 1) else \
        [slice(i, i + 1) for i in range(len(prompts))]
    outs = []
    for r in rows:
        feed = {ids_in.name: ids[r].astype(INT_TYPES[ids_in.type])}
        if mask_in is not None:
            feed[mask_in.name] = mask[r].astype(INT_TYPES[mask_in.type])
        outs.append(sess.run([out_name], feed)[0])
    emb = np.concatenate(outs, 0)
    if emb.ndim != 2 or emb.shape[0] != len(prompts):
        raise ToolError(f"output {out_name} has shape {emb.shape}; expected [{len(prompts)}, dim]")
    emb = emb.astype(np.float32)
    if not np.all(np.isfinite(emb)):
        raise ToolError("the text encoder produced non-finite values")
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    if np.any(norms == 0):
        raise ToolError(f"zero text embedding for prompt(s) {list(np.nonzero(norms == 0)[0] + 1)}")
    if normalize:
        emb = (emb / norms[:, None]).astype(np.float32)
    return np.ascontiguousarray(emb)


def write_npy(path, emb):
    """Write float32 C-order [prompts, dim]; returns its SHA-256."""
    np.save(path, np.ascontiguousarray(emb, dtype=np.float32))
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def manifest_snippet(fname, sha, positives, scale=100.0, threshold=0.52):
    return (f'[zero_shot]\ntext_embeddings = "{fname}"\ntext_embeddings_sha256 = "{sha}"\n'
            f"positives = {positives}\nscale = {scale!r}\nthreshold = {threshold!r}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-encoder", required=True, help="ONNX text encoder")
    ap.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer.json")
    ap.add_argument("--prompts", required=True, help="one prompt a line, positive prompts first")
    ap.add_argument("--out", required=True, help="text_embeddings.npy to write")
    ap.add_argument("--context", type=int, default=77, help="token context length (CLIP: 77)")
    ap.add_argument("--pad-id", type=int, default=None, help="pad token id (default: tokenizer's, else 0)")
    ap.add_argument("--output", default=None, help="the encoder output to use (default: text_embeds)")
    ap.add_argument("--normalize", action="store_true", help="write L2-normalised rows")
    ap.add_argument("--positives", type=int, default=None,
                    help="number of positive prompts, for the printed snippet (default: upstream's 10)")
    args = ap.parse_args(argv)
    try:
        prompts = read_prompts(args.prompts)
        emb = encode_prompts(args.text_encoder, args.tokenizer, prompts, args.context, args.pad_id,
                             args.output, args.normalize)
        sha = write_npy(args.out, emb)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pos = args.positives if args.positives is not None else min(10, len(prompts))
    print(f"wrote {args.out}: float32 {list(emb.shape)} ({'normalised' if args.normalize else 'unnormalised'})")
    print(f"sha256 {sha}")
    print(manifest_snippet(os.path.basename(args.out), sha, pos), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
