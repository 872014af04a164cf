"""Greedy generation with the "flex" attention implementation (tiny random Llama, CPU or GPU).

python examples/generate.py
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_flexattn  # noqa: F401 - importing registers attn_implementation="flex"

device = "cuda" if torch.cuda.is_available() else "cpu"
config = AutoConfig.for_model(
    "llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    pad_token_id=0,
)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="flex").to(device).eval()
# (a pretrained checkpoint works the same way:
#  AutoModelForCausalLM.from_pretrained(path, attn_implementation="flex"))

# two prompts, the second left-padded
input_ids = torch.tensor([[5, 17, 33, 42, 8, 91], [0, 0, 0, 12, 64, 7]], device=device)
attention_mask = (input_ids != 0).long()

for cache in ("dynamic", "static"):
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        cache_implementation=cache,
    )
    print(f"{cache:>7} cache:", out[:, input_ids.shape[1] :].tolist())
