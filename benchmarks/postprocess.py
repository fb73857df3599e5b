"""Benchmark: vectorised SQuAD post-processing (`hf_sparse.squad.postprocess`) against the tutorial's per-example loop.

Run on one core, from the repository root:

    OMP_NUM_THREADS=1 taskset -c 0 python -m benchmarks.postprocess

Both run on the same synthetic logits (SQuAD-dev-sized by default: 10,570 examples, ~10,800 features of 384
tokens) in the same process; the script checks that they return identical answers (v1 and v2 mode) and prints
both times. `loop_postprocess` is also the reference that `tests/test_postprocess.py` compares against.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np


def loop_postprocess(
    ids,
    contexts,
    feature_example,
    offset_mapping,
    start_logits,
    end_logits,
    n_best_size=20,
    max_answer_length=30,
    version_2_with_negative=False,
    null_score_diff_threshold=0.0,
):
    """The tutorial's algorithm, one feature and one (start, end) pair at a time.

    `offset_mapping[f][t]` is a `(start, end)` pair, or `None` for tokens outside the context. Ties: earlier token
    among equal logits, first pair met (start rank, then end rank), earlier feature. Returns `{id: text}`.
    """
    features_per_example = collections.defaultdict(list)
    for f, e in enumerate(feature_example):
        features_per_example[int(e)].append(f)
    answers = {}
    for e, qid in enumerate(ids):
        best = None  # (score, char_start, char_end)
        min_null = None
        for f in features_per_example[e]:
            s_logits, e_logits, offsets = start_logits[f], end_logits[f], offset_mapping[f]
            null = s_logits[0] + e_logits[0]
            if min_null is None or null < min_null:
                min_null = null
            start_indexes = np.argsort(-s_logits, kind="stable")[:n_best_size].tolist()
            end_indexes = np.argsort(-e_logits, kind="stable")[:n_best_size].tolist()
            for s in start_indexes:
                for t in end_indexes:
                    if s >= len(offsets) or t >= len(offsets) or offsets[s] is None or offsets[t] is None:
                        continue
                    if t < s or t - s + 1 > max_answer_length:
                        continue
                    score = s_logits[s] + e_logits[t]
                    if best is None or score > best[0]:
                        best = (score, offsets[s][0], offsets[t][1])
        if best is None:
            answers[qid] = ""
        elif version_2_with_negative and min_null - best[0] > null_score_diff_threshold:
            answers[qid] = ""
        else:
            answers[qid] = contexts[e][best[1] : best[2]]
    return answers


def synthetic_inputs(num_examples=10570, seq_len=384, two_feature_every=45, seed=0):
    """Examples, features and logits shaped like SQuAD dev: every `two_feature_every`-th example has 2 features.

    Returns `(examples, features, start_logits, end_logits)`; features as a dict of columns with offsets in the
    library's convention (`[-1, -1]` outside the context), examples as a dict of columns.
    """
    rng = np.random.default_rng(seed)
    ids, contexts, feature_example, offsets = [], [], [], []
    for e in range(num_examples):
        n_features = 2 if e % two_feature_every == 0 else 1
        q_len = int(rng.integers(8, 24))
        ctx_tokens = seq_len - q_len - 3
        total_tokens = ctx_tokens + (ctx_tokens // 2 if n_features == 2 else 0)
        words = [f"w{e % 997}x{j}" for j in range(total_tokens)]
        context = " ".join(words)
        spans, pos = [], 0
        for w in words:
            spans.append((pos, pos + len(w)))
            pos += len(w) + 1
        ids.append(f"q{e:05d}")
        contexts.append(context)
        for k in range(n_features):
            first = k * (ctx_tokens // 2)
            row = np.full((seq_len, 2), -1, dtype=np.int64)
            row[q_len + 2 : q_len + 2 + ctx_tokens] = spans[first : first + ctx_tokens]
            offsets.append(row)
            feature_example.append(e)
    offsets = np.stack(offsets)
    num_features = len(offsets)
    # Logits rounded to a coarse grid so that ties happen, as they do with float16 models.
    start = (np.round(rng.standard_normal((num_features, seq_len)) * 8) / 4).astype(np.float32)
    end = (np.round(rng.standard_normal((num_features, seq_len)) * 8) / 4).astype(np.float32)
    # A high CLS score on every third feature, so that v2 mode predicts "no answer" for some examples.
    start[::3, 0] += 4
    end[::3, 0] += 4
    examples = {"id": ids, "context": contexts}
    features = {"example_id": [ids[e] for e in feature_example], "offset_mapping": offsets}
    return examples, features, start, end


def _as_tutorial_offsets(offsets: np.ndarray):
    return [[None if pair[0] < 0 else (int(pair[0]), int(pair[1])) for pair in row] for row in offsets.tolist()]


def main():
    from hf_sparse.squad.postprocess import SquadPostprocessor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_examples", type=int, default=10570)
    parser.add_argument("--seq_len", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of the vectorised version (best kept)")
    args = parser.parse_args()

    examples, features, start, end = synthetic_inputs(args.num_examples, args.seq_len)
    feature_example = [int(i[1:]) for i in features["example_id"]]
    tutorial_offsets = _as_tutorial_offsets(features["offset_mapping"])
    print(f"{len(examples['id'])} examples, {len(start)} features, {args.seq_len} logits each")

    for v2 in (False, True):
        t0 = time.perf_counter()
        post = SquadPostprocessor(examples, features, version_2_with_negative=v2)
        build = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fast = post(start, end).as_dict()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        slow = loop_postprocess(
            examples["id"],
            examples["context"],
            feature_example,
            tutorial_offsets,
            start,
            end,
            version_2_with_negative=v2,
        )
        loop_time = time.perf_counter() - t0
        mismatches = [i for i in examples["id"] if fast[i] != slow[i]]
        mode = "v2" if v2 else "v1"
        print(
            f"[{mode}] vectorised: {min(times):.3f} s per call (best of {args.repeats}; building the index once: "
            f"{build:.3f} s) | loop: {loop_time:.3f} s | speed-up x{loop_time / min(times):.1f} | "
            f"identical answers: {not mismatches} ({len(examples['id']) - len(mismatches)}/{len(examples['id'])}), "
            f"empty answers: {sum(1 for t in fast.values() if not t)}"
        )
        if mismatches:
            raise SystemExit(f"answers differ for {len(mismatches)} examples, first {mismatches[0]!r}")


if __name__ == "__main__":
    main()
