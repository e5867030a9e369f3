"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2` (gloo, CPU).

`TASK[:PARALLEL] OUT`, PARALLEL ddp (default) or fsdp2:
  rm      reward-model steps on a batch doubled across ranks
  ppo     2 PPO steps
  dpo     DPO steps on a batch doubled across ranks
  resume  2 PPO steps straight, and 1 step + save + load into a fresh trainer + 1 step
  fields  tests/_resume_cases.py for PPO, GRPO, RM and DPO: {"diffs": {algo: [what differs, on either rank]},
          "stops": {algo: how the uninterrupted run stopped}} (no model entries)
Rank 0 saves {"world", "rows": its metrics per step, "full": the trained model's full parameters (gathered
when sharded), "ranks": every rank's local parameters (ddp only)}."""

import gc
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import _tiny_models as T

from rlhf_fast.trainer.parallel import ModelState, is_sharded


def full_params(model) -> torch.Tensor | None:
    """Every parameter in named_parameters order, unsharded: on rank 0 only."""
    state = ModelState(model).state_dict()  # a collective when sharded
    if dist.get_rank() != 0:
        return None
    return torch.cat([state[name].detach().flatten() for name, _ in model.named_parameters()])


def run(task: str, parallel: str, out: str) -> dict:
    result = {}
    if task == "rm":
        tr = T.rm_trainer(parallel=parallel)
        result["rows"] = tr.train()
        model = tr.model
    elif task == "ppo":
        tr = T.ppo_trainer(steps=2, batch_size=6, parallel=parallel)
        result["rows"] = tr.train()
        model = tr.policy
    elif task == "dpo":
        tr = T.dpo_trainer(steps=6, parallel=parallel)
        result["rows"] = tr.train()
        model = tr.policy
    elif task == "resume":
        ck = os.path.join(os.path.dirname(out), "resume_ck.pt")
        straight = T.ppo_trainer(steps=2, batch_size=6, parallel=parallel, kl_target=0.5, kl_horizon=50)
        straight.train()
        result["straight"] = full_params(straight.policy)
        first = T.ppo_trainer(steps=2, batch_size=6, parallel=parallel, kl_target=0.5, kl_horizon=50)
        first.train(1)
        first.save(ck)
        tr = T.ppo_trainer(steps=2, batch_size=6, parallel=parallel, seed=7, kl_target=0.5, kl_horizon=50)
        tr.load(ck)
        assert tr.step_count == 1
        tr.train()
        model = tr.policy
        result["checkpoint"] = ck
        del straight, first
    else:
        raise SystemExit(f"unknown task {task!r}")
    result["sharded"] = is_sharded(model)
    result["full"] = full_params(model)
    if not result["sharded"]:
        flat = T.flat_params(model)
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        result["ranks"] = gathered
    # Free the DDP reducers before the process group: left to interpreter teardown, a reducer's
    # destructor held the GIL while joining a gloo thread that was waiting for it (seen hung).
    del tr, model
    gc.collect()
    return result


def resume_fields(out: str) -> dict:
    import _resume_cases

    diffs, stops = {}, {}
    for algo in _resume_cases.MAKERS:
        mine, stops[algo] = _resume_cases.compare(algo, os.path.dirname(out))
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        diffs[algo] = [f"rank {r}: {d}" for r, ds in enumerate(every) for d in ds]
        gc.collect()  # the DDP reducers of this algorithm's trainers go before the next one's
    return {"diffs": diffs, "stops": stops}


def main(mode: str, out: str) -> None:
    task, _, parallel = mode.partition(":")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = resume_fields(out) if task == "fields" else run(task, parallel or "ddp", out)
    if dist.get_rank() == 0:
        torch.save({"world": dist.get_world_size(), **result}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
