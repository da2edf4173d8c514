#!/usr/bin/env python3
"""Our backends' logits vs Hugging Face transformers, on the GPU machine (issue 6).

For each flavour (a Llama-3-style model with GQA and Llama-3 RoPE scaling, a Qwen2-style model
with q/k/v bias and tied embeddings; small, random weights) this
  1. builds the model with transformers, perturbs what a fresh init leaves trivial (norm weights,
     Qwen2 biases; q/k scaled up so attention is not flat), rounds the weights to bf16 and saves
     them (save_pretrained, safetensors);
  2. runs transformers in fp32 on those bf16 weights (eager attention) as the reference: the
     greedy 64-token continuation of each fixed prompt (raw bytes as token ids, as
     kvrecall-worker does without a tokenizer.json) and the teacher-forced logits of the 65
     positions that chose them; and transformers in bf16 as the yardstick of "bf16 tolerance";
  3. runs worker_cuda_logits_check (cpu and cuda backends, teacher-forced on the same tokens) and
     kvrecall-worker generate --mode=dense (free-running greedy, the product's path);
  4. does the same for models/recall-tiny against its reference_logits_fp32.json.
Writes OUT/hf_oracle.json and prints a summary. Exit status 1 if a check fails:
  - logits: our max |error| vs the fp32 reference at most 2x that of transformers' own bf16 run
    (or relative L2 <= 1e-2);
  - greedy tokens: teacher-forced, our argmax equals the reference's at every decisive position
    (the reference's top-2 margin above twice our error there);
  - continuation: kvrecall-worker generate's 64 tokens identical to transformers', except that
    a divergence at a near tie (not decisive, as above) is reported as a note, not a failure.

Usage: hf_oracle.py --bin DIR (kvrecall-worker, worker_cuda_logits_check) --out DIR
                    [--recall-tiny models/recall-tiny] [--backends cpu,cuda]
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
import transformers

PROMPTS = [
    "The pass key is 48213. Remember it. What is the pass key? The pass key is",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole,",
]
STEPS = 64
VOCAB = 512
# transformers 5 renamed from_pretrained's torch_dtype to dtype.
DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def make_config(flavour):
    major = int(transformers.__version__.split(".")[0])
    common = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
                  max_position_embeddings=131072, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if flavour == "llama3":
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)
        kw = dict(head_dim=64, tie_word_embeddings=False, attention_bias=False)
        if major >= 5:
            kw["rope_parameters"] = rope
        else:
            kw["rope_theta"] = rope.pop("rope_theta")
            kw["rope_scaling"] = rope
        return transformers.LlamaConfig(**common, **kw)
    kw = dict(tie_word_embeddings=True, use_sliding_window=False)
    if major >= 5:
        kw["rope_parameters"] = dict(rope_type="default", rope_theta=1000000.0)
    else:
        kw["rope_theta"] = 1000000.0
    return transformers.Qwen2Config(**common, **kw)


def build(flavour, model_dir, seed):
    torch.manual_seed(seed)
    cfg = make_config(flavour)
    model = transformers.AutoModelForCausalLM.from_config(cfg, **{DTYPE_KW: torch.float32})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                # N(0, 1), as make-model does: logits with a std of ~sqrt(hidden), so that
                # greedy choices are decisive. With 0.1 (a first version) the Llama model's top-2
                # margins fell to 0.002 and transformers' own bf16 run left its fp32 continuation
                # after 5 tokens: identical continuations would test tie-breaking, not the math.
                p.copy_(torch.randn_like(p))
    model = model.to(torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)
    return model


@torch.no_grad()
def reference(model_dir, prompt_ids, dtype):
    """Greedy continuation and teacher-forced logits [len(prompt)-1, len(prompt)+STEPS)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, **{DTYPE_KW: dtype}, attn_implementation="eager").cuda().eval()
    ids = list(prompt_ids)
    for _ in range(STEPS):
        logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        ids.append(int(torch.argmax(logits)))
    logits = model(torch.tensor([ids], device="cuda")).logits[0].float()
    logits = logits[len(prompt_ids) - 1:].cpu().numpy()
    del model
    torch.cuda.empty_cache()
    return ids[len(prompt_ids):], logits


def ours_logits(bin_dir, backend, model_dir, tokens, first, work):
    tok_file = os.path.join(work, "tokens.txt")
    out_file = os.path.join(work, f"logits_{backend}.f32")
    with open(tok_file, "w") as f:
        f.write(" ".join(map(str, tokens)))
    subprocess.run([os.path.join(bin_dir, "worker_cuda_logits_check"), backend, model_dir, tok_file,
                    str(first), out_file], check=True)
    return np.fromfile(out_file, dtype=np.float32).reshape(len(tokens) - first, -1)


def ours_generate(bin_dir, backend, model_dir, prompt, steps, work):
    out_file = os.path.join(work, f"generate_{backend}.json")
    subprocess.run([os.path.join(bin_dir, "kvrecall-worker"), "generate", f"--model={model_dir}",
                    f"--backend={backend}", "--mode=dense", f"--prompt={prompt}",
                    f"--max_new_tokens={steps}", f"--json={out_file}"], check=True,
                   stdout=subprocess.DEVNULL)
    with open(out_file) as f:
        j = json.load(f)
    return j["generated"], dict(prefill_s=j["prefill_seconds"], decode_tok_s=j["tokens_per_second"])


def errors(ours, ref):
    d = ours.astype(np.float64) - ref
    return dict(max_abs=float(np.abs(d).max()),
                rel_l2=float(np.linalg.norm(d) / np.linalg.norm(ref)),
                argmax_agree=int((ours.argmax(-1) == ref.argmax(-1)).sum()), rows=int(ref.shape[0]))


def margins(ref):
    top2 = np.sort(ref, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def first_divergence(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--recall-tiny", default="")
    ap.add_argument("--backends", default="cpu,cuda")
    args = ap.parse_args()
    backends = args.backends.split(",")
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join("/tmp", "hf_oracle")
    os.makedirs(work, exist_ok=True)
    results = dict(transformers=transformers.__version__, torch=torch.__version__,
                   device=torch.cuda.get_device_name(0), flavours={})
    failures, notes = [], []

    for seed, flavour in enumerate(["llama3", "qwen2"]):
        model_dir = os.path.join(work, flavour)
        build(flavour, model_dir, seed + 1)
        fres = results["flavours"][flavour] = {}
        for pi, text in enumerate(PROMPTS):
            prompt = list(text.encode())
            cont32, ref = reference(model_dir, prompt, torch.float32)
            cont16, bf = reference(model_dir, prompt, torch.bfloat16)
            tokens = prompt + cont32
            first = len(prompt) - 1
            # transformers' own bf16 run, teacher-forced on the fp32 continuation.
            m = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, **{DTYPE_KW: torch.bfloat16}, attn_implementation="eager").cuda()
            with torch.no_grad():
                bf_tf = m(torch.tensor([tokens], device="cuda")).logits[0, first:].float().cpu().numpy()
            del m
            marg = margins(ref)
            entry = dict(prompt_tokens=len(prompt), hf_fp32_continuation=cont32,
                         hf_bf16_first_divergence=first_divergence(cont16, cont32),
                         hf_bf16=errors(bf_tf, ref), min_top2_margin=float(marg[:STEPS].min()))
            tol_abs = 2.0 * entry["hf_bf16"]["max_abs"]
            for b in backends:
                ours = ours_logits(args.bin, b, model_dir, tokens, first, work)
                e = errors(ours, ref)
                row_err = np.abs(ours.astype(np.float64) - ref).max(-1)
                # Decisive rows: the reference's top-2 margin exceeds twice our error there.
                decisive = marg > 2 * row_err
                e["decisive_rows"] = int(decisive.sum())
                e["decisive_argmax_agree"] = int((ours.argmax(-1) == ref.argmax(-1))[decisive].sum())
                gen, e["generate_speed"] = ours_generate(args.bin, b, model_dir, text, STEPS, work)
                div = first_divergence(gen, cont32)
                e["generate_first_divergence"] = div
                e["generate_identical"] = div is None
                if div is not None:
                    e["margin_at_divergence"] = float(marg[div])
                    e["error_at_divergence"] = float(row_err[div])
                    e["divergence_at_near_tie"] = bool(not decisive[div])
                e["within_tolerance"] = e["max_abs"] <= tol_abs or e["rel_l2"] <= 1e-2
                entry[b] = e
                if not e["within_tolerance"]:
                    failures.append(f"{flavour} prompt {pi} {b}: logits {e}")
                if e["decisive_argmax_agree"] != e["decisive_rows"]:
                    failures.append(f"{flavour} prompt {pi} {b}: greedy token differs at a "
                                    "decisive position (teacher-forced)")
                if div is not None:
                    # A near tie (reference margin below our bf16-level error) is reported, not
                    # failed: past it the two continuations are different texts.
                    (notes if e["divergence_at_near_tie"] else failures).append(
                        f"{flavour} prompt {pi} {b}: continuation diverges at step {div}, "
                        f"reference top-2 margin {marg[div]:.4g}, our error there "
                        f"{row_err[div]:.4g}")
            fres[f"prompt{pi}"] = entry
            print(json.dumps({flavour: {f"prompt{pi}": {k: v for k, v in entry.items()
                                                        if k != "hf_fp32_continuation"}}}),
                  flush=True)

    if args.recall_tiny:
        with open(os.path.join(args.recall_tiny, "reference_logits_fp32.json")) as f:
            rt = json.load(f)
        rres = results["recall_tiny"] = {}
        for name, p in rt["prompts"].items():
            ref = np.array(p["logits"], dtype=np.float64)[None, :]
            ids = p["token_ids"]
            entry = {}
            for b in backends:
                e = errors(ours_logits(args.bin, b, args.recall_tiny, ids, len(ids) - 1, work), ref)
                e["within_tolerance"] = e["rel_l2"] <= 1e-2
                if not e["within_tolerance"] or e["argmax_agree"] != 1:
                    failures.append(f"recall-tiny {name} {b}: {e}")
                if "greedy_continuation" in p:
                    want = p["greedy_continuation"]["ids"]
                    gen, _ = ours_generate(args.bin, b, args.recall_tiny, rt["text"], len(want), work)
                    e["generate_identical"] = gen == want
                    if gen != want:
                        failures.append(f"recall-tiny {name} {b}: generated {gen}, want {want}")
                entry[b] = e
            rres[name] = entry
            print(json.dumps({"recall-tiny": {name: entry}}), flush=True)

    results["failures"] = failures
    results["notes"] = notes
    with open(os.path.join(args.out, "hf_oracle.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("NOTES:", *notes, sep="\n")
    print("FAILURES:" if failures else "ALL CHECKS PASSED", *failures, sep="\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
