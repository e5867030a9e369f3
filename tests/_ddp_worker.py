"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2` (gloo, CPU):
`rm OUT`: reward-model steps on a doubled-across-ranks batch, rank 0 saves the params;
`ppo OUT`: PPO steps, every rank's params gathered, rank 0 saves them."""
import gc
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import test_trainer as T  # noqa: E402


def main(mode: str, out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    if mode == "rm":
        tr = T.rm_trainer()
        tr.train()
        model = tr.model
    else:
        tr = T._ppo(steps=2, batch_size=6)
        tr.train()
        model = tr.policy
    flat = T._params(model)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        torch.save({"ranks": gathered, "world": dist.get_world_size()}, out)
    # Free the DDP reducers before the process group: left to interpreter teardown, a reducer's
    # destructor held the GIL while joining a gloo thread that was waiting for it (seen hung).
    del tr, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
