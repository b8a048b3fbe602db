#!/usr/bin/env python3
"""DEV-TIME fidelity check of the upstream export against timm itself (needs torch + timm; not for CI).

  /tmp/tv/bin/python tools/check_export_timm.py [--photos P1 P2 P3] [--work /tmp/check_export]

For each of efficientnet_b4 and tf_efficientnet_b4: build the timm model (num_classes=0,
global_pool="", random init, BatchNorm running stats and affine set to non-trivial random values,
eval mode) plus an embedding Linear(1792->512) and a random arc.weight [15587,512]; torch.save a
Lightning-shaped checkpoint; run tools/export_upstream.py on it (--arch given); then on real photos
at 512x512 compare
  (a) the exported ONNX (onnxruntime) with timm forward -> average pool -> Linear -> L2,
  (b) tools/effnet_ref.embed (numpy float64) with the same,
  (c) the same checkpoint exported with the OTHER --arch vs timm (why the arch choice matters).
Also checks the checkpoint writer/reader against torch: torch.load(weights_only=True) of a checkpoint
written by torch_legacy.save_checkpoint is bit-exact (and byte-identical to torch.save's file given
the same serialization id), and torch_legacy.load_checkpoint of the real torch.save file is bit-exact.
"""
import argparse
import collections
import glob
import os
import subprocess
import sys
import time

import numpy as np
import torch
import timm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import effnet_ref  # noqa: E402
import torch_legacy  # noqa: E402

ROWS, DIM = 15587, 512


def make_model(arch, seed):
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="").eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
                mod.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
                mod.bias.copy_(0.1 * torch.randn(n, generator=g))
                mod.num_batches_tracked.fill_(int(torch.randint(1000, 99999, (1,), generator=g)))
    emb = torch.nn.Linear(1792, DIM)
    arc = torch.randn(ROWS, DIM, generator=g)
    return m, emb, arc


def timm_embed(m, emb, x):
    with torch.no_grad():
        f = m(torch.from_numpy(x)).mean((2, 3))
        return torch.nn.functional.normalize(emb(f), dim=1)[0].double().numpy()


def lightning_ckpt(m, emb, arc, arch):
    sd = collections.OrderedDict()
    for k, v in m.state_dict().items():
        sd["model." + k] = v
    sd["embedding.weight"], sd["embedding.bias"], sd["arc.weight"] = emb.weight.data, emb.bias.data, arc
    return {"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
            "hyper_parameters": {"model_name": arch, "embedding_size": DIM, "s": 30.0}}


def check_io(work):
    """Writer -> torch.load and torch.save -> reader, bit-exact, on a Lightning-shaped timm checkpoint."""
    m, emb, arc = make_model("efficientnet_b4", 3)
    ck = lightning_ckpt(m, emb, arc, "efficientnet_b4")
    real = os.path.join(work, "torch_saved.ckpt")
    torch.save(ck, real)
    sd, hp = torch_legacy.load_checkpoint(real)
    assert list(sd) == list(ck["state_dict"]), "reader: key order differs"
    for k, v in ck["state_dict"].items():
        got = sd[k]
        assert got.dtype == v.numpy().dtype and got.shape == tuple(v.shape) and np.array_equal(got, v.numpy()), k
    assert hp == ck["hyper_parameters"], hp
    print(f"reader: torch.save'd Lightning checkpoint ({len(sd)} keys incl. int64 num_batches_tracked) read bit-exactly")

    np_ck = dict(ck, state_dict=collections.OrderedDict((k, v.numpy()) for k, v in ck["state_dict"].items()))
    ours_dir = os.path.join(work, "ours")
    os.makedirs(ours_dir, exist_ok=True)
    ours = os.path.join(ours_dir, "torch_saved.ckpt")  # same archive name as torch's file
    import zipfile
    sid = zipfile.ZipFile(real).read("torch_saved/.data/serialization_id").decode()
    torch_legacy.save_checkpoint(ours, np_ck, serialization_id=sid)
    back = torch.load(ours, weights_only=True)
    assert [k for k in back if k != "state_dict"] == [k for k in ck if k != "state_dict"]
    for k, v in ck["state_dict"].items():
        b = back["state_dict"][k]
        assert b.dtype == v.dtype and b.shape == v.shape and torch.equal(b, v), k
    for k in ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters"):
        assert back[k] == ck[k], k
    same = open(ours, "rb").read() == open(real, "rb").read()
    print(f"writer: torch.load(weights_only=True) of save_checkpoint's file is bit-exact; "
          f"file byte-identical to torch.save's (same serialization id): {same}")
    return same


class OnnxRunner:
    """onnxruntime in this interpreter, or (torch venvs often lack it) in --ort-python via a subprocess."""

    def __init__(self, path, ort_python):
        self.path, self.ort_python = path, ort_python
        try:
            import onnxruntime as ort
            self.sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except ImportError:
            self.sess = None

    def run(self, x):
        if self.sess is not None:
            return self.sess.run(["embedding"], {"input": x})[0][0].astype(np.float64)
        import tempfile
        with tempfile.TemporaryDirectory() as t:
            np.save(os.path.join(t, "x.npy"), x)
            code = ("import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1], "
                    "providers=['CPUExecutionProvider']); np.save(sys.argv[3], s.run(['embedding'], "
                    "{'input': np.load(sys.argv[2])})[0][0])")
            subprocess.run([self.ort_python, "-c", code, self.path, os.path.join(t, "x.npy"),
                            os.path.join(t, "y.npy")], check=True)
            return np.load(os.path.join(t, "y.npy")).astype(np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", nargs="*")
    ap.add_argument("--work", default="/tmp/check_export")
    ap.add_argument("--ort-python", default="python3", help="a python with onnxruntime, if this one lacks it")
    args = ap.parse_args()
    photos = args.photos or sorted(glob.glob(os.path.join(HERE, "..", "..", "shared", "data", "whales-dev",
                                                          "positives", "*.jpg")))[:3]
    os.makedirs(args.work, exist_ok=True)
    check_io(args.work)
    xs = [effnet_ref.preprocess(p) for p in photos]
    arches = ["efficientnet_b4", "tf_efficientnet_b4"]
    built = {}
    for n, arch in enumerate(arches):
        m, emb, arc = make_model(arch, 10 + n)
        d = os.path.join(args.work, arch)
        os.makedirs(d, exist_ok=True)
        ckpt = os.path.join(d, "efficientnet_b4_512_fold0.ckpt")
        torch.save(lightning_ckpt(m, emb, arc, arch), ckpt)
        ids = np.array([f"{i:012x}" for i in range(ROWS)])
        np.save(os.path.join(d, "encoder_classes.npy"), ids)
        with open(os.path.join(d, "species_map.csv"), "w") as f:
            f.write("individual_id,species\n" + "".join(f"{i},beluga\n" for i in ids))
        other = [a for a in arches if a != arch][0]
        sessions = []
        for use, sub in ((arch, "model"), (other, "model_wrong_arch")):
            t = time.time()
            subprocess.run([sys.executable, os.path.join(HERE, "export_upstream.py"), "--ckpt", ckpt,
                            "--arch", use, "--classes", os.path.join(d, "encoder_classes.npy"),
                            "--species", os.path.join(d, "species_map.csv"), "--out", os.path.join(d, sub)],
                           check=True, stdout=subprocess.DEVNULL)
            if not sessions:
                t_export = time.time() - t
            sessions.append(OnnxRunner(os.path.join(d, sub, "embedder.onnx"), args.ort_python))
        built[arch] = (m, emb, sessions[0], sessions[1], torch_legacy.load_checkpoint(ckpt)[0], t_export)
    for arch in arches:
        m, emb, sess, sess_wrong, sd, t_export = built[arch]
        da, db, dc, t_ref = [], [], [], []
        for x in xs:
            want = timm_embed(m, emb, x)
            got_onnx = sess.run(x)
            t = time.time()
            got_ref = effnet_ref.embed(sd, arch, x)
            t_ref.append(time.time() - t)
            wrong = sess_wrong.run(x)
            da.append(np.abs(got_onnx - want).max())
            db.append(np.abs(got_ref - want).max())
            dc.append((np.abs(wrong - want).max(), float(wrong @ want)))
        print(f"{arch}: export {t_export:.1f} s; over {len(xs)} photos at 512x512:")
        print(f"  (a) ONNX (onnxruntime) vs timm: max |diff| {max(da):.2e}")
        print(f"  (b) effnet_ref (numpy f64) vs timm: max |diff| {max(db):.2e} ({np.mean(t_ref):.2f} s/image)")
        print(f"  (c) same checkpoint exported as the other arch vs timm: max |diff| {max(d for d, _ in dc):.2e}, "
              f"cosine {min(c for _, c in dc):.4f}")


if __name__ == "__main__":
    main()
