"""The tiny LM config the tests share (imported by name: `from tiny_config import TINY`)."""

# A config small enough to train in seconds on one CPU thread, large enough to beat the unigram baseline. Pinned to
# the CPU: the tests compare runs bitwise and hold losses to values recorded there (on a GPU machine too).
TINY = [
    "recipe=baseline",  # the recipe these tests were written for (the lm task's default is recipe fast)
    "device=cpu",
    "max_steps=120", "threads=1", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "data.batch_size=8", "data.eval_tokens=4096", "eval_interval=40", "checkpoint_interval=40",
    "sample.tokens=8", "optimizer.lr=3e-3", "schedule.warmup=10", "schedule.min_lr=3e-4",
]
