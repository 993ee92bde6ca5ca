"""Run under `accelerate launch --multi_gpu --num_processes 2`: each rank feeds its own
data to a quantizer for a few training steps, then rank 0 reports whether the codebooks
and EMA buffers of the ranks are identical, and whether it can evaluate alone."""

import json
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator

from stage1_vqvae.quantizer import VectorQuantizer

accelerator = Accelerator()
rank = accelerator.process_index
torch.manual_seed(0)  # same initial codebook on every rank
quantizer = VectorQuantizer(codebook_size=64, dim=4, dead_code_steps=2).train()
generator = torch.Generator().manual_seed(100 + rank)  # different data on every rank
torch.manual_seed(1000 + rank)  # and different restart choices, unless rank 0 broadcasts them
restarts = 0
for _ in range(8):
    z = torch.randn(2, 4, 3, 3, generator=generator) * (1 + rank)
    before = quantizer.steps_unused.clone()
    quantizer(z)
    restarts += int(((before + 1 >= 2) & (quantizer.steps_unused == 0)).sum())

def spread(tensor):
    gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return max((g - gathered[0]).abs().max().item() for g in gathered)

first_inputs = torch.randn(1, generator=torch.Generator().manual_seed(100 + rank))
report = {
    "world_size": accelerator.num_processes,
    "inputs_differ": spread(first_inputs) > 0,
    "restarts": restarts,
    "max_codebook_difference": spread(quantizer.codebook.data),
    "max_buffer_difference": max(spread(quantizer.embed_avg), spread(quantizer.cluster_size)),
}
if accelerator.is_main_process:  # one rank alone evaluates, as the main process does for grids
    quantizer.eval()(torch.randn(2, 4, 3, 3))
    report["lone_eval_returned"] = True
    with open(sys.argv[1], "w") as file:
        json.dump(report, file)
accelerator.wait_for_everyone()
accelerator.end_training()
