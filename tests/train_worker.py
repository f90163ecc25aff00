"""A training run in its own process, for the resume tests: `python tests/train_worker.py OUT STEPS [KILL_AT]`.

With KILL_AT, the process sends itself SIGKILL at the start of that step's callback, i.e. after the
checkpoint of the previous step was written, as a Colab disconnect would. The pairs are the sample pairs cut
to four aspect ratios (``OUT-data``), so the run trains at four buckets, two samples of one bucket per batch.
"""

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kontext_helpers as kh

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_samples")


def config(out: str, steps: int, resume: bool) -> kh.TrainConfig:
    return kh.TrainConfig(resolution=64, steps=steps, batch_size=2, gradient_accumulation_steps=2, rank=4,
                          learning_rate=3e-3, region_learning_rate=1e-2, lr_scheduler="cosine", lr_warmup_steps=2,
                          max_sequence_length=32, checkpoint_every=2, keep_checkpoints=2, output_dir=out,
                          resume=resume, seed=7, depth_kind="tokens", depth_dropout=0.3)


ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1))


def mixed_shapes(pairs, root: str) -> kh.KontextPairs:
    """The pairs cut to ``ASPECTS`` in turn, written as a folder and opened with buckets at 64 px."""
    items = [kh.crop_to_aspect(pairs[i], ASPECTS[i % len(ASPECTS)]) for i in range(len(pairs))]
    parts = [[it[k] for it in items] for k in ("context", "target", "mask", "depth", "prompt")]
    return kh.write_pair_folder(root, *parts, names=[it["name"] for it in items], overwrite=True, resolution=64,
                                resize="bucket")


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else None

    def callback(record):
        if kill_at is not None and record.get("step") == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    pipe = kh.load_pipeline("tiny", seed=0)
    dataset = mixed_shapes(kh.KontextPairs(ROOT, resolution=128, resize="square"), out + "-data")
    kh.train(pipe, dataset, config(out, steps, resume=True), callback=callback, progress=False)


if __name__ == "__main__":
    main()
