#!/usr/bin/env python3
"""Dense accuracy of the exported reference model on held-out synthetic tasks (GPU machine).

    python3 eval.py --model models/recall-tiny --corpus .refdata/corpus.txt.xz --out $OUT/eval.json \
        [--contexts 4096,8192,16384,32768] [--per-depth 24] [--logits-out $OUT/logits_fp32.json]

Haystacks come from the held-out 3% of the corpus documents; keys from a seed unused in training.
Each sample is exactly `context` tokens long (prompt + answer). An answer counts as correct when
greedy decoding reproduces every digit, which (the answer being a fixed-length digit run) is the
same as: with the correct prefix, every answer digit is the argmax -- computed in one forward pass.
The model runs in bf16 (its stored dtype) with the flash SDPA kernel.

Tasks: passkey at depths 10%..90% (per depth), multikey (the asked needle at each depth; 2..8
needles), vartrack (1..3 hops, with a distractor chain), ar (dense associative recall, per query).

--logits-out: fp32 (eager attention) logits at the last position of two fixed short prompts, for
comparison with the worker's CPU backend: "raw_bytes" (token id = byte value, no <|bos|>: what
`kvrecall-worker generate --prompt=...` feeds today) and "bpe" (<|bos|> + tokenizer.json ids).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modeling  # noqa: E402
import tasks  # noqa: E402

DEPTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
FIXED_PROMPT = "The pass key is 48213. Remember it. What is the pass key? The pass key is"


def load_model(path, dtype, attn="sdpa"):
    from transformers import LlamaForCausalLM
    try:
        m = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except TypeError:
        m = LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation=attn)
    return m.cuda().eval()


@torch.no_grad()
def score(model, samples, max_tokens=131072):
    """samples: list of (ids [L+1], answers). Returns per-sample list of per-answer correctness."""
    L = len(samples[0][0]) - 1
    bs = max(1, max_tokens // L)
    head = model.get_output_embeddings()
    out = []
    for i in range(0, len(samples), bs):
        chunk = samples[i:i + bs]
        # The model reads ids[:L] (the full sequence minus its last token: <|eos|> or '.').
        x = torch.from_numpy(np.stack([s[0][:-1] for s in chunk])).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model.model(input_ids=x, use_cache=False).last_hidden_state
        for r, (ids, answers) in enumerate(chunk):
            res = []
            for a in answers:
                pos = torch.from_numpy(np.asarray(a) - 1).cuda()
                pred = head(h[r, pos]).argmax(-1).cpu().numpy()
                res.append(bool((pred == ids[np.asarray(a)]).all()))
            out.append(res)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", default=".refdata/corpus.txt.xz")
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="4096,8192,16384,32768")
    ap.add_argument("--per-depth", type=int, default=24)
    ap.add_argument("--multikey-per-depth", type=int, default=8)
    ap.add_argument("--vartrack", type=int, default=64)
    ap.add_argument("--ar", type=int, default=4)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--logits-out", default="")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    modeling.install_attention()
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    _, hold = modeling.load_corpus(tok, args.corpus)
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    gen = tasks.TaskGen(enc, hold, tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>"),
                        np.random.default_rng(args.seed))
    model = load_model(args.model, torch.bfloat16)
    modeling.check_model(model)
    res = {"model": args.model, "method": "dense", "dtype": "bfloat16",
           "metric": "exact match of greedy-decoded answer digits", "tasks": {}}
    t0 = time.time()
    for L in [int(c) for c in args.contexts.split(",")]:
        # passkey, per depth
        pk = {}
        for d in DEPTHS:
            smp = [gen.passkey(L, depth=d)[:3:2] for _ in range(args.per_depth)]
            ok = [r[0] for r in score(model, smp)]
            pk[f"{d:.1f}"] = {"accuracy": float(np.mean(ok)), "n": len(ok)}
        pk["all"] = {"accuracy": float(np.mean([v["accuracy"] for v in pk.values()])),
                     "n": args.per_depth * len(DEPTHS)}
        res["tasks"].setdefault("passkey", {})[str(L)] = pk
        # multikey, per depth of the asked needle
        mk = {}
        for d in DEPTHS:
            smp = []
            while len(smp) < args.multikey_per_depth:
                s = gen.multikey(L, queries=1, depth=d)
                if s is not None:
                    smp.append((s[0], s[2]))
            ok = [r[0] for r in score(model, smp)]
            mk[f"{d:.1f}"] = {"accuracy": float(np.mean(ok)), "n": len(ok)}
        mk["all"] = {"accuracy": float(np.mean([v["accuracy"] for v in mk.values()])),
                     "n": args.multikey_per_depth * len(DEPTHS)}
        res["tasks"].setdefault("multikey", {})[str(L)] = mk
        # vartrack, per hop count
        vt = {}
        for hops in (1, 2, 3):
            smp = []
            while len(smp) < args.vartrack // 3:
                s = gen.vartrack(L, hops=hops)
                if s is not None:
                    smp.append((s[0], s[2]))
            ok = [r[0] for r in score(model, smp)]
            vt[f"hops{hops}"] = {"accuracy": float(np.mean(ok)), "n": len(ok)}
        vt["all"] = {"accuracy": float(np.mean([v["accuracy"] for v in vt.values()])),
                     "n": 3 * (args.vartrack // 3)}
        res["tasks"].setdefault("vartrack", {})[str(L)] = vt
        # dense associative recall, per query
        smp = [gen.ar(L)[:3:2] for _ in range(args.ar)]
        ok = [x for r in score(model, smp) for x in r]
        res["tasks"].setdefault("ar", {})[str(L)] = {"all": {"accuracy": float(np.mean(ok)), "n": len(ok)}}
        print(f"context {L:6d}: passkey {pk['all']['accuracy']:.3f} "
              f"[{' '.join('%.2f' % pk[k]['accuracy'] for k in pk if k != 'all')}]  "
              f"multikey {mk['all']['accuracy']:.3f}  vartrack {vt['all']['accuracy']:.3f}  "
              f"ar {np.mean(ok):.3f}  ({time.time()-t0:.0f} s)", flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)

    # Markdown table (passkey per depth).
    ctxs = list(res["tasks"]["passkey"])
    print("\n| task | context | " + " | ".join(f"{int(d*100)}%" for d in DEPTHS) + " | all |")
    print("|---|---|" + "---|" * (len(DEPTHS) + 1))
    for task in ("passkey", "multikey"):
        for L in ctxs:
            row = res["tasks"][task][L]
            print(f"| {task} | {L} | " + " | ".join("%.0f" % (row["%.1f" % d]["accuracy"] * 100) for d in DEPTHS)
                  + f" | {row['all']['accuracy']*100:.1f} |")
    for task in ("vartrack", "ar"):
        print(f"| {task} | " + ", ".join("%s: %.1f" % (L, res["tasks"][task][L]["all"]["accuracy"] * 100)
                                        for L in ctxs) + " |")

    if args.logits_out:
        m32 = load_model(args.model, torch.float32, attn="eager")
        out = {"model": args.model, "dtype": "float32", "attention": "eager (transformers)",
               "text": FIXED_PROMPT, "prompts": {}}
        with torch.no_grad():
            for name, ids in (("raw_bytes", list(FIXED_PROMPT.encode())),
                              ("bpe", [tok.token_to_id("<|bos|>")] + enc(FIXED_PROMPT))):
                logits = m32(input_ids=torch.tensor([ids]).cuda()).logits[0, -1].float().cpu()
                top = torch.topk(logits, 5)
                out["prompts"][name] = {"token_ids": ids, "argmax": int(logits.argmax()),
                                        "top5": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
                                        "logits": [float(v) for v in logits]}
        bpe_greedy = []
        with torch.no_grad():  # what the model answers to the BPE prompt (greedy, 6 tokens)
            ids = out["prompts"]["bpe"]["token_ids"][:]
            for _ in range(6):
                nxt = int(m32(input_ids=torch.tensor([ids]).cuda()).logits[0, -1].argmax())
                ids.append(nxt)
                bpe_greedy.append(nxt)
        out["prompts"]["bpe"]["greedy_continuation"] = {"ids": bpe_greedy, "text": tok.decode(bpe_greedy)}
        with open(args.logits_out, "w") as fh:
            json.dump(out, fh)
        print("fixed prompt: bpe greedy continuation", repr(tok.decode(bpe_greedy)),
              "| raw-bytes argmax", out["prompts"]["raw_bytes"]["argmax"], flush=True)


if __name__ == "__main__":
    main()
