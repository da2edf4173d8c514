#!/usr/bin/env python3
"""Times torch.nn.functional.scaled_dot_product_attention on the decode shapes of
worker_cuda_kernel_bench and writes the comparison (ours / torch) as JSON.

Run on the GPU machine, in the same call as the bench:
  worker_cuda_kernel_bench > ours.json
  python3 sdpa_reference.py --ours ours.json --out compare.json
The same with `worker_cuda_kernel_bench --prefill` compares the causal prefill attention
(the JSON's "mode" says which): torch gets q [1, 32, n, 128] and K/V [1, 8, start + n, 128];
the chunk's mask (query i sees keys [0, start + i]) is is_causal=True when start == 0, else the
lower-right causal bias (torch.nn.attention.bias.causal_lower_right) or an explicit boolean
mask; every (mask form, backend) that accepts the call is timed and the fastest is the baseline.

Torch gets q [B, 32, 1, 128] and K/V [B, 8, L, 128] bf16 (its natural contiguous layout), with
enable_gqa=True; every SDPA backend that accepts the call (flash, cuDNN, memory-efficient) is
timed and the fastest is the baseline, so "dense" is compared with the strongest torch path.
Timing as in the bench: CUDA-graph replays of 20 calls, median of 7 replays after a warm-up,
random inputs. A repeat_interleave variant (K/V expanded to 32 heads outside the timed region)
is timed too where memory allows, for reference only.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CALLS, REPLAYS = 20, 7


def time_graph(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / CALLS)
    del g
    times.sort()
    return times[REPLAYS // 2]


BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def time_events(fn):
    """Median per-call time without a CUDA graph (for calls that refuse capture)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    times.sort()
    return times[REPLAYS // 2]


def fastest(times):
    """The timings that ran ({name: ms}, None = unavailable) and the name of the fastest."""
    ok = {name: t for name, t in times.items() if t is not None}
    return ok, (min(ok, key=ok.get) if ok else None)


def write_result(ours, rows, path):
    """Writes our run's fields with its rows replaced by `rows` (ours next to torch's)."""
    result = {k: v for k, v in ours.items() if k != "rows"}
    result["torch"] = torch.__version__
    result["rows"] = rows
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def prefill(ours, args):
    from torch.nn.attention.bias import causal_lower_right
    hq, hkv, d = ours["num_q_heads"], ours["num_kv_heads"], ours["head_dim"]
    rows = []
    for r in ours["rows"]:
        n, start = r["n"], r["start"]
        ctx = start + n
        torch.manual_seed(n * 100003 + start)
        q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
        masks = {}
        if start == 0:
            masks["is_causal"] = dict(is_causal=True)
        else:
            masks["lower_right"] = dict(attn_mask=causal_lower_right(n, ctx))
            pos = torch.arange(ctx, device="cuda")
            masks["bool_mask"] = dict(attn_mask=pos[None, :] <= (start + torch.arange(
                n, device="cuda"))[:, None])
        ref = None
        per = {}
        for mname, kw in masks.items():
            for bname, be in BACKENDS.items():
                key = f"{bname}/{mname}"
                fn = lambda kw=kw: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
                try:
                    with sdpa_kernel([be]):
                        out = fn()
                        torch.cuda.synchronize()
                        try:
                            t = time_graph(fn)
                        except Exception:  # a call that cannot be captured: plain launches
                            torch.cuda.synchronize()
                            t = time_events(fn)
                    per[key] = t
                    if ref is None:
                        ref = out.float()
                    else:
                        err = (out.float() - ref).norm() / ref.norm()
                        if err > 1e-2:
                            print(f"warning: {key} differs by {err:.3g}", file=sys.stderr)
                    del out
                except Exception as e:
                    per[key] = None
                    print(f"n {n} start {start}: {key} unavailable: "
                          f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}",
                          file=sys.stderr)
        ok, best = fastest(per)
        row = dict(r)
        row.update({
            "torch_ms": ok[best] if best else None,
            "torch_variant": best,
            "torch_ms_by_variant": per,
            "torch_tflops": r["flops"] / ok[best] / 1e9 if best else None,
            "ratio_ours_over_torch": (r["ours_ms"] / ok[best]) if best else None,
        })
        rows.append(row)
        del q, k, v, ref, masks
        torch.cuda.empty_cache()
    write_result(ours, rows, args.out)
    print(f"{'n':>5} {'start':>6} {'ours_ms':>9} {'rows64':>9} {'rows128':>9} {'torch_ms':>9} "
          f"{'variant':>22} {'ratio':>6} {'ours_TF':>7} {'torch_TF':>8}")
    for r in rows:
        print(f"{r['n']:>5} {r['start']:>6} {r['ours_ms']:>9.4f} {r['ms_block_rows_64']:>9.4f} "
              f"{r['ms_block_rows_128']:>9.4f} {(r['torch_ms'] or float('nan')):>9.4f} "
              f"{str(r['torch_variant']):>22} {(r['ratio_ours_over_torch'] or float('nan')):>6.3f} "
              f"{r['ours_tflops']:>7.1f} {(r['torch_tflops'] or float('nan')):>8.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.ours) as f:
        ours = json.load(f)
    if ours.get("mode") == "prefill":
        prefill(ours, args)
        return
    hq, hkv, d = ours["num_q_heads"], ours["num_kv_heads"], ours["head_dim"]
    backends = BACKENDS
    rows = []
    for r in ours["rows"]:
        b, L = r["batch"], r["context"]
        torch.manual_seed(b * 100003 + L)
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, hkv, L, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, hkv, L, d, device="cuda", dtype=torch.bfloat16)
        ref = None
        per_backend = {}
        for name, be in backends.items():
            try:
                with sdpa_kernel([be]):
                    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    torch.cuda.synchronize()
                    t = time_graph(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                per_backend[name] = t
                if ref is None:
                    ref = out.float()
                else:  # the backends must agree with each other
                    err = (out.float() - ref).norm() / ref.norm()
                    if err > 1e-2:
                        print(f"warning: {name} differs by {err:.3g}", file=sys.stderr)
            except Exception as e:  # a backend that refuses the shape
                per_backend[name] = None
                print(f"batch {b} context {L}: {name} unavailable: {str(e).splitlines()[0][:160]}",
                      file=sys.stderr)
        rep_ms = None
        free, _ = torch.cuda.mem_get_info()
        if 2 * k.numel() * 2 * (hq // hkv) < free * 0.8:
            kr = k.repeat_interleave(hq // hkv, dim=1)
            vr = v.repeat_interleave(hq // hkv, dim=1)
            rep_ms = time_graph(lambda: F.scaled_dot_product_attention(q, kr, vr))
            del kr, vr
        ok, best = fastest(per_backend)
        row = dict(r)
        row.update({
            "torch_ms": ok[best] if best else None,
            "torch_backend": best,
            "torch_ms_by_backend": per_backend,
            "torch_repeat_interleave_ms": rep_ms,
            "ratio_ours_over_torch": (r["ours_ms"] / ok[best]) if best else None,
            "floor_ms_at_3TBps": r["bytes"] / 3.0e12 * 1e3,
        })
        rows.append(row)
        del q, k, v, ref
        torch.cuda.empty_cache()
    write_result(ours, rows, args.out)
    print(f"{'batch':>5} {'ctx':>6} {'ours_ms':>9} {'torch_ms':>9} {'backend':>9} {'ratio':>6} "
          f"{'GB/s':>7} {'floor':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['context']:>6} {r['ours_ms']:>9.4f} "
              f"{(r['torch_ms'] or float('nan')):>9.4f} {str(r['torch_backend']):>9} "
              f"{(r['ratio_ours_over_torch'] or float('nan')):>6.3f} {r['ours_gbps']:>7.0f} "
              f"{r['floor_ms_at_3TBps']:>7.4f}")


if __name__ == "__main__":
    main()
