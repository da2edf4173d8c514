"""Synthetic long-range tasks over a natural-text haystack, built directly in token space.

Pure Python + NumPy (no torch), so it can be checked on the development machine with a byte-level
stand-in tokenizer. Every task has a rigid answer format: the answer is a run of single-digit tokens
(the tokenizer keeps digits unmerged), preceded by a space token, so "exact match under greedy
decoding" is "every answer digit is the argmax given the correct prefix".

A sample is a sequence of L + 1 token ids: the model reads ids[:-1] and predicts ids[1:].
`weights[i]` weighs the loss of predicting ids[i] (i >= 1); `answers` lists, for each answer, the
indices i of its digit tokens (predicted from position i - 1).

Tasks
- passkey:  " The pass key is 48213. Remember it. 48213 is the pass key." at a depth in natural text,
            then "\nWhat is the pass key? The pass key is" -> " 48213".
- multikey: K (2..8) needles " The special magic number for qzv is 48213." at random depths,
            then up to 4 questions "\nWhat is the special magic number for qzv? The special magic
            number for qzv is" -> " 48213".
- vartrack: a chain " VAR QZV = 48213." ... " VAR ABC = VAR QZV." (1..3 hops) plus a distractor chain,
            in order at random depths; "\nWhat is the value of VAR ABC? VAR ABC =" -> " 48213".
- ar:       dense associative recall: " qzv=4812;" pairs filling most of the context, then
            " ? qzv=4812;" queries about earlier pairs (the values are the targets). Teaches the
            induction / copy circuit quickly; needle tasks alone barely do (METHODS.md).
- text:     plain natural text (language modelling only).
"""
import string

import numpy as np

TASKS = ("passkey", "multikey", "vartrack", "ar", "text")

LM_WEIGHT_TEXT = 1.0  # plain text samples
LM_WEIGHT_HAY = 0.5  # haystack and templates in needle samples
ANSWER_WEIGHT = 50.0  # digits of a needle task's answer
AR_WEIGHT = 5.0  # digits of a dense-recall query's value


class TaskGen:
    """Builds samples. `enc(text) -> list[int]` must not add special tokens.

    corpus: 1-D integer array of haystack tokens (documents joined). rng: np.random.Generator.
    """

    def __init__(self, enc, corpus, bos, eos, rng):
        self.enc = enc
        self.corpus = corpus
        self.bos, self.eos = bos, eos
        self.rng = rng
        self.digit = np.array([self._one(enc(str(d))) for d in range(10)], dtype=np.int64)
        sp = enc(" 12345")
        if len(sp) != 6 or list(sp[1:]) != [int(self.digit[d]) for d in (1, 2, 3, 4, 5)]:
            raise ValueError(f"tokenizer must keep digits unmerged: ' 12345' -> {sp}")
        self.space = sp[0]
        self.period = np.array(enc("."), dtype=np.int64)
        # Dense-recall keys: 3 lowercase letters whose " key" encoding has the most common length,
        # so that pairs and queries have a fixed token length and can be built with array ops.
        keys = ["".join(t) for t in _letter_triples()]
        encs = [enc(" " + k) for k in keys]
        lens = np.array([len(e) for e in encs])
        self.ar_key_len = int(np.bincount(lens).argmax())
        keep = lens == self.ar_key_len
        self.ar_keys = np.array([e for e, k in zip(encs, keep) if k], dtype=np.int64)
        self.eq = self._one(enc("="))
        self.semi = self._one(enc(";"))
        self.qmark = np.array(enc(" ?"), dtype=np.int64)
        self.key_pool = keys  # for needle keys (any length)

    @staticmethod
    def _one(ids):
        if len(ids) != 1:
            raise ValueError(f"expected one token, got {ids}")
        return ids[0]

    # ---- helpers ----
    def _number(self, ndigits=5):
        first = self.rng.integers(1, 10)
        rest = self.rng.integers(0, 10, size=ndigits - 1)
        return "".join(str(d) for d in [first, *rest])

    def _answer(self, value):
        ids = np.array(self.enc(" " + value), dtype=np.int64)
        return ids  # [space, d, d, ...]

    def _haystack(self, n):
        start = int(self.rng.integers(0, len(self.corpus) - n - 1))
        return np.asarray(self.corpus[start:start + n], dtype=np.int64)

    def _assemble(self, L, hay_fill, needles, depths, tail_parts, lm_weight):
        """bos + haystack with needles inserted at depths (fractions, sorted) + tail parts.

        tail_parts: list of (ids, weight-or-None, is_answer). Returns ids, weights, answers, or None
        if the fixed parts do not fit in L + 1 tokens.
        """
        fixed = 1 + sum(len(n) for n in needles) + sum(len(p[0]) for p in tail_parts)
        n_hay = L + 1 - fixed
        if n_hay < 16:
            return None
        hay = hay_fill(n_hay)
        cuts = [int(round(d * n_hay)) for d in depths]
        parts, prev = [np.array([self.bos])], 0
        for c, nd in zip(cuts, needles):
            parts.append(hay[prev:c])
            parts.append(nd)
            prev = c
        parts.append(hay[prev:])
        ids_head = np.concatenate(parts)
        w = [np.full(len(ids_head), lm_weight, dtype=np.float32)]
        ids = [ids_head]
        answers, pos = [], len(ids_head)
        for p, weight, is_answer in tail_parts:
            ids.append(p)
            ww = np.full(len(p), lm_weight if weight is None else weight, dtype=np.float32)
            if is_answer:
                ww[0] = lm_weight  # the space before the digits
                answers.append(np.arange(pos + 1, pos + len(p)))
            w.append(ww)
            pos += len(p)
        ids = np.concatenate(ids)
        w = np.concatenate(w)
        w[0] = 0.0
        assert len(ids) == L + 1, (len(ids), L)
        return ids, w, answers

    # ---- tasks ----
    def passkey(self, L, depth=None, hay_fill=None):
        hay_fill = hay_fill or self._haystack
        key = self._number(5)
        needle = np.array(self.enc(f" The pass key is {key}. Remember it. {key} is the pass key."), np.int64)
        q = np.array(self.enc("\nWhat is the pass key? The pass key is"), np.int64)
        depth = float(self.rng.uniform(0.0, 1.0)) if depth is None else depth
        tail = [(q, None, False), (self._answer(key), ANSWER_WEIGHT, True),
                (np.concatenate([self.period, [self.eos]]), None, False)]
        out = self._assemble(L, hay_fill, [needle], [depth], tail, LM_WEIGHT_HAY)
        return None if out is None else out + ({"depth": depth},)

    def multikey(self, L, k=None, queries=4, depth=None):
        k = int(self.rng.integers(2, 9)) if k is None else k
        names = self.rng.choice(len(self.key_pool), size=k, replace=False)
        names = [self.key_pool[i] for i in names]
        vals = [self._number(5) for _ in range(k)]
        depths = sorted(float(x) for x in self.rng.uniform(0.0, 1.0, size=k))
        needles = [np.array(self.enc(f" The special magic number for {n} is {v}."), np.int64)
                   for n, v in zip(names, vals)]
        asked = self.rng.permutation(k)[:queries]
        if depth is not None:  # evaluation: ask about the needle placed at `depth`
            depths[int(asked[0])] = depth
            order = np.argsort(depths, kind="stable")
            depths = [depths[i] for i in order]
            needles = [needles[i] for i in order]
            names = [names[i] for i in order]
            vals = [vals[i] for i in order]
            asked = [int(np.where(order == asked[0])[0][0])]
        tail = []
        for i in asked:
            q = np.array(self.enc(f"\nWhat is the special magic number for {names[i]}? "
                                  f"The special magic number for {names[i]} is"), np.int64)
            tail += [(q, None, False), (self._answer(vals[i]), ANSWER_WEIGHT, True),
                     (self.period, None, False)]
        tail.append((np.array([self.eos]), None, False))
        out = self._assemble(L, self._haystack, needles, depths, tail, LM_WEIGHT_HAY)
        return None if out is None else out + ({"k": k, "depth": depths[int(asked[0])]},)

    def vartrack(self, L, hops=None):
        hops = int(self.rng.integers(1, 4)) if hops is None else hops
        names = self.rng.choice(len(self.key_pool), size=2 * (hops + 1), replace=False)
        names = [self.key_pool[i].upper() for i in names]
        val, other = self._number(5), self._number(5)
        chains = []
        for c, v in ((names[:hops + 1], val), (names[hops + 1:], other)):
            st = [f" VAR {c[0]} = {v}."] + [f" VAR {c[j]} = VAR {c[j - 1]}." for j in range(1, hops + 1)]
            chains.append(st)
        # Interleave both chains in order at random depths.
        slots = sorted(float(x) for x in self.rng.uniform(0.0, 1.0, size=2 * (hops + 1)))
        which = self.rng.permutation([0] * (hops + 1) + [1] * (hops + 1))
        idx, needles = [0, 0], []
        for wchain in which:
            needles.append(np.array(self.enc(chains[wchain][idx[wchain]]), np.int64))
            idx[wchain] += 1
        target = names[hops]
        q = np.array(self.enc(f"\nWhat is the value of VAR {target}? VAR {target} ="), np.int64)
        tail = [(q, None, False), (self._answer(val), ANSWER_WEIGHT, True),
                (np.concatenate([self.period, [self.eos]]), None, False)]
        out = self._assemble(L, self._haystack, needles, slots, tail, LM_WEIGHT_HAY)
        return None if out is None else out + ({"hops": hops},)

    def ar(self, L, query_frac=None):
        """Dense associative recall: fixed-length pairs, then queries, filled to L + 1 tokens."""
        kl = self.ar_key_len
        pair_len = kl + 1 + 4 + 1
        q_len = len(self.qmark) + pair_len
        query_frac = float(self.rng.uniform(0.2, 0.35)) if query_frac is None else query_frac
        body = L + 1 - 2  # bos ... eos
        n_q = max(1, int(body * query_frac) // q_len)
        n_p = (body - n_q * q_len) // pair_len
        n_p = min(n_p, len(self.ar_keys))
        keys = self.rng.choice(len(self.ar_keys), size=n_p, replace=False)
        vals = self.rng.integers(0, 10, size=(n_p, 4))
        pairs = np.empty((n_p, pair_len), np.int64)
        pairs[:, :kl] = self.ar_keys[keys]
        pairs[:, kl] = self.eq
        pairs[:, kl + 1:kl + 5] = self.digit[vals]
        pairs[:, kl + 5] = self.semi
        which = self.rng.integers(0, n_p, size=n_q)
        nq = len(self.qmark)
        queries = np.empty((n_q, q_len), np.int64)
        queries[:, :nq] = self.qmark
        queries[:, nq:] = pairs[which]
        qw = np.zeros((n_q, q_len), np.float32)
        qw[:, nq + kl + 1:nq + kl + 5] = AR_WEIGHT
        qw[:, nq + kl] = 1.0  # '=' is predictable
        qw[:, nq + kl + 5] = 1.0  # ';'
        pad = L + 1 - 2 - n_p * pair_len - n_q * q_len
        filler = self._haystack(pad) if pad > 0 else np.zeros(0, np.int64)
        ids = np.concatenate([[self.bos], filler, pairs.ravel(), queries.ravel(), [self.eos]])
        w = np.concatenate([[0.0], np.full(pad, LM_WEIGHT_HAY, np.float32), np.zeros(n_p * pair_len, np.float32),
                            qw.ravel(), [1.0]]).astype(np.float32)
        start = 1 + pad + n_p * pair_len
        ans = start + np.arange(n_q)[:, None] * q_len + (nq + kl + 1) + np.arange(4)[None, :]
        assert len(ids) == L + 1
        return ids, w, list(ans), {"pairs": n_p, "queries": n_q}

    def text(self, L):
        ids = np.concatenate([[self.bos], self._haystack(L)])
        w = np.full(L + 1, LM_WEIGHT_TEXT, np.float32)
        w[0] = 0.0
        return ids, w, [], {}

    def sample(self, task, L):
        for _ in range(8):
            out = getattr(self, task)(L)
            if out is not None:
                return out
        raise RuntimeError(f"cannot build {task} at L={L}")


def _letter_triples():
    lo = string.ascii_lowercase
    for a in lo:
        for b in lo:
            for c in lo:
                yield a, b, c


def make_batch(gen, L, batch, probs, tasks=TASKS):
    """A batch of `batch` samples of length L + 1 with tasks drawn from `probs`.

    Returns ids [B, L+1] int64, weights [B, L+1] float32, answer list of (row, task, positions).
    """
    ids = np.empty((batch, L + 1), np.int64)
    w = np.empty((batch, L + 1), np.float32)
    answers = []
    choice = gen.rng.choice(len(tasks), size=batch, p=probs)
    for r, t in enumerate(choice):
        s_ids, s_w, s_ans, _ = gen.sample(tasks[t], L)
        ids[r], w[r] = s_ids, s_w
        for a in s_ans:
            answers.append((r, tasks[t], np.asarray(a)))
    return ids, w, answers
