"""keel's baseline recipe (`recipe: baseline`) in a plain PyTorch loop, built from keel's units without the trainer.

AdamW (betas 0.9/0.95, decoupled weight decay 0.1, none on biases, norms and embeddings), linear warmup then
cosine decay to a minimum LR, global-norm clipping at 1.0 with the unclipped norm logged, an EMA of the weights.

    python examples/plain_loop.py            # a few hundred steps on CPython's documentation
    python examples/plain_loop.py --steps 50
"""

import argparse

import torch

from keel import optim, schedules
from keel.averaging import EMA
from keel.data import RandomWindowSampler, load_tokens, sequential_windows, unigram_cross_entropy
from keel.grad import clip_by_global_norm
from keel.models import GPT, GPTConfig, lm_loss_sum


@torch.no_grad()
def evaluate(model, tokens, block_size):
    model.eval()
    total, count = 0.0, 0
    for x, y in sequential_windows(tokens, block_size, batch_size=32, max_tokens=32768):
        total += float(lm_loss_sum(model(x), y))
        count += y.numel()
    model.train()
    return total / count


def main(steps: int = 300, block_size: int = 64, batch_size: int = 16, lr: float = 2e-3) -> float:
    torch.manual_seed(0)
    data = load_tokens("pydoc")
    sampler = RandomWindowSampler(data.train, block_size, batch_size, seed=0)
    model = GPT(GPTConfig(vocab_size=256, block_size=block_size, n_layer=2, n_head=4, n_embd=64))
    optimizer = optim.create("adamw", model, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = schedules.warmup(schedules.cosine_decay(lr, steps - steps // 20, min_lr=lr / 10), steps // 20)
    ema = EMA(model, decay=0.99)

    for step in range(steps):  # step = optimizer updates already applied
        schedules.set_lr(optimizer, schedule(step))
        x, y = sampler.batch(step)
        loss = lm_loss_sum(model(x), y) / y.numel()
        loss.backward()
        grad_norm = clip_by_global_norm(model.parameters(), max_norm=1.0)  # returns the unclipped norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  grad_norm {float(grad_norm):.3f}  lr {schedule(step):.2e}")

    val_loss = evaluate(model, data.val, block_size)
    ema.copy_to(model)
    ema_loss = evaluate(model, data.val, block_size)
    baseline = unigram_cross_entropy(data.train, data.val, 256)
    print(f"val_loss {val_loss:.4f}  val_loss_ema {ema_loss:.4f}  unigram baseline {baseline:.4f}")
    return val_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
