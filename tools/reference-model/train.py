#!/usr/bin/env python3
"""Trains the reference model (recall-tiny) on natural text + synthetic long-range tasks.

Runs on the GPU machine. The schedule is by wall-clock fraction of --time (so a phase always ends
inside a device call's limit): the context length and the task mixture follow --lengths and the
learning rate follows linear warm-up (--warmup steps) then cosine decay to --min-lr over the time.

    python3 train.py --tokenizer tok.json --corpus .refdata/corpus.txt.xz --time 390 \
        --lengths 0:2048,0.3:4096,0.55:8192,0.8:16384 --ckpt-out $OUT --log $OUT/train_a.csv
    python3 train.py ... --resume .refdata/ckpt --lr 1e-3 --lengths 0:16384,0.3:32768 --export DIR

Every --log-every steps one CSV row: step, phase fraction, seconds, tokens seen, context length,
loss (weighted), LM loss (natural-text tokens), and per task the exact-match rate of the batch's
answers (teacher-forced argmax of every answer digit) -- the training curves.
"""
import argparse
import csv
import math
import os
import queue
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modeling  # noqa: E402
import tasks  # noqa: E402

EARLY_MIX = {"passkey": 0.20, "multikey": 0.15, "vartrack": 0.10, "ar": 0.45, "text": 0.10}
LATE_MIX = {"passkey": 0.30, "multikey": 0.20, "vartrack": 0.10, "ar": 0.30, "text": 0.10}


def parse_lengths(s):
    out = []
    for part in s.split(","):
        f, L = part.split(":")
        out.append((float(f), int(L)))
    return sorted(out)


def length_at(sched, f):
    L = sched[0][1]
    for start, length in sched:
        if f >= start:
            L = length
    return L


def mix_at(f, early_until):
    m = EARLY_MIX if f < early_until else LATE_MIX
    return np.array([m[t] for t in tasks.TASKS], dtype=np.float64)


class Prefetcher:
    """Builds batches on a background thread; the spec follows the phase's elapsed time."""

    def __init__(self, gen, sched, tokens_per_step, budget_s, early_until, depth=3):
        self.gen, self.sched, self.tps = gen, sched, tokens_per_step
        self.budget, self.early_until = budget_s, early_until
        self.q = queue.Queue(maxsize=depth)
        self.t0 = None
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self, t0):
        self.t0 = t0
        self.thread.start()

    def _run(self):
        try:
            while not self.stop:
                f = min(1.0, (time.time() - self.t0) / self.budget)
                L = length_at(self.sched, f)
                B = max(1, self.tps // L)
                ids, w, ans = tasks.make_batch(self.gen, L, B, mix_at(f, self.early_until))
                item = (L, torch.from_numpy(ids).pin_memory(), torch.from_numpy(w).pin_memory(), ans)
                while not self.stop:
                    try:
                        self.q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except Exception as e:  # surface generator errors in the main thread
            self.q.put(e)

    def get(self):
        item = self.q.get()
        if isinstance(item, Exception):
            raise item
        return item


def answer_accuracy(logits, y, answers):
    """Per task: (exact answers, answers) under teacher forcing. answers: (row, task, positions)."""
    if not answers:
        return {}
    rows = np.concatenate([np.full(len(p), r) for r, _, p in answers])
    cols = np.concatenate([p for _, _, p in answers]) - 1  # logits[i] predicts ids[i + 1]
    r_t = torch.from_numpy(rows).to(logits.device)
    c_t = torch.from_numpy(cols).to(logits.device)
    ok = (logits[r_t, c_t].argmax(-1) == y[r_t, c_t]).cpu().numpy()
    out, i = {}, 0
    for _, task, p in answers:
        good = bool(ok[i:i + len(p)].all())
        i += len(p)
        a, n = out.get(task, (0, 0))
        out[task] = (a + good, n + 1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--corpus", default=".refdata/corpus.txt.xz")
    ap.add_argument("--time", type=float, required=True, help="training seconds (wall clock)")
    ap.add_argument("--lengths", default="0:2048,0.3:4096,0.55:8192,0.8:16384",
                    help="fraction:context pairs; the context length switches at each fraction")
    ap.add_argument("--early-until", type=float, default=0.25, help="fraction that uses EARLY_MIX")
    ap.add_argument("--tokens-per-step", type=int, default=131072)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--resume", default="", help="directory of ckpt*.safetensors (fp32) to start from")
    ap.add_argument("--ckpt-out", default="", help="write fp32 ckpt*.safetensors here at the end")
    ap.add_argument("--export", default="", help="write the HF bf16 model directory here at the end")
    ap.add_argument("--log", default="train.csv")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--tokens-before", type=int, default=0, help="tokens seen by earlier phases (for the log)")
    ap.add_argument("--steps-before", type=int, default=0)
    ap.add_argument("--summary", default="", help="append a one-line summary of the phase here")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print("attention:", modeling.install_attention(), flush=True)

    tok = Tokenizer.from_file(args.tokenizer)
    t = time.time()
    train_ids, hold_ids = modeling.load_corpus(tok, args.corpus)
    print(f"corpus: {len(train_ids)/1e6:.2f} M train tokens, {len(hold_ids)/1e6:.2f} M held out "
          f"({time.time()-t:.1f} s)", flush=True)
    enc = lambda s: tok.encode(s).ids  # noqa: E731  (no post-processor: no specials added)
    gen = tasks.TaskGen(enc, train_ids, tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>"),
                        np.random.default_rng(args.seed + args.steps_before))

    model = modeling.build_model(tok)
    if args.resume:
        modeling.load_shards(model, args.resume)
        print("resumed from", args.resume, flush=True)
    model.cuda().train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params/1e6:.2f} M parameters ({n_params*2/1e6:.1f} MB bf16), "
          f"attn_implementation={model.config._attn_implementation}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)

    sched = parse_lengths(args.lengths)
    pf = Prefetcher(gen, sched, args.tokens_per_step, args.time, args.early_until)
    V = tok.get_vocab_size()
    log_f = open(args.log, "w", newline="")
    cols = ["step", "frac", "seconds", "tokens", "context", "batch", "lr", "loss", "lm_loss"] + \
           [f"acc_{t}" for t in tasks.TASKS if t != "text"] + ["step_ms"]
    writer = csv.DictWriter(log_f, fieldnames=cols)
    writer.writeheader()

    t0 = time.time()
    pf.start(t0)
    step, tokens = 0, 0
    acc_window = {}
    first_at_len = {}
    last_log_t = t0
    while True:
        elapsed = time.time() - t0
        f = elapsed / args.time
        if f >= 1.0:
            break
        L, ids, w, answers = pf.get()
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, f)))
        for g in opt.param_groups:
            g["lr"] = lr
        ids = ids.cuda(non_blocking=True)
        w = w.cuda(non_blocking=True)
        x, y, wy = ids[:, :-1], ids[:, 1:], w[:, 1:]
        ts = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=x, use_cache=False).logits
        tok_loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1), reduction="none").view_as(wy)
        loss = (tok_loss * wy).sum() / wy.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()
        if L not in first_at_len:
            torch.cuda.synchronize()
            first_at_len[L] = True
            print(f"  first step at context {L} (batch {x.shape[0]}): {1000*(time.time()-ts):.0f} ms "
                  f"(incl. warm-up); attention calls {modeling.ATTN_STATS}", flush=True)
        if step % args.log_every == 0 or step == 1:
            with torch.no_grad():
                acc = answer_accuracy(logits.detach(), y, answers)
                lm_mask = (wy > 0) & (wy <= 1.0)
                lm_loss = (tok_loss.detach() * lm_mask).sum() / lm_mask.sum().clamp(min=1)
            for k, (a, n) in acc.items():
                pa, pn = acc_window.get(k, (0, 0))
                acc_window[k] = (pa + a, pn + n)
            now = time.time()
            row = {"step": step + args.steps_before, "frac": round(f, 4), "seconds": round(now - t0, 1),
                   "tokens": tokens + args.tokens_before, "context": L, "batch": x.shape[0],
                   "lr": f"{lr:.3g}", "loss": round(loss.item(), 4), "lm_loss": round(lm_loss.item(), 4),
                   "step_ms": round(1000 * (now - last_log_t) / (args.log_every if step > 1 else 1), 1)}
            for k in tasks.TASKS:
                if k != "text":
                    a, n = acc.get(k, (0, 0))
                    row[f"acc_{k}"] = round(a / n, 3) if n else ""
            writer.writerow(row)
            log_f.flush()
            last_log_t = now
            if step % (args.log_every * 10) == 0 or step == 1:
                accs = " ".join(f"{k}={a/n:.2f}({n})" for k, (a, n) in sorted(acc_window.items()))
                print(f"step {step:5d} {now-t0:6.1f}s L={L:5d} tokens={(tokens+args.tokens_before)/1e6:7.1f}M "
                      f"lr={lr:.2e} loss={loss.item():.3f} lm={lm_loss.item():.3f} | {accs}", flush=True)
                acc_window = {}
    pf.stop = True
    torch.cuda.synchronize()
    dt = time.time() - t0
    print(f"done: {step} steps, {tokens/1e6:.1f} M tokens in {dt:.0f} s ({tokens/dt/1e6:.2f} M tok/s); "
          f"total {(tokens+args.tokens_before)/1e6:.1f} M tokens, {step+args.steps_before} steps", flush=True)
    log_f.close()
    model.eval()
    if args.ckpt_out:
        modeling.save_shards(model, args.ckpt_out)
    if args.export:
        modeling.export(model, args.tokenizer, args.export)
        print("exported to", args.export, flush=True)
    if args.summary:
        with open(args.summary, "a") as fh:
            fh.write(f"steps {step} (total {step+args.steps_before}) tokens {tokens} (total "
                     f"{tokens+args.tokens_before}) seconds {dt:.0f} lengths {args.lengths} lr {args.lr}\n")


if __name__ == "__main__":
    main()
