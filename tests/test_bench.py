"""The counters behind `anomalens bench`: FLOPs of known operations and the matmul probe."""

import torch
import torch.nn.functional as F

from anomalens.bench import count_flops, matmul_gflops


def test_count_flops_of_a_linear_layer_and_cpu_fused_attention():
    x = torch.randn(3, 5, 8)
    weight = torch.randn(16, 8)
    assert count_flops(F.linear, x, weight) == 2 * 3 * 5 * 8 * 16
    q, k, v = torch.randn(2, 4, 7, 6), torch.randn(2, 4, 9, 6), torch.randn(2, 4, 9, 6)
    with torch.no_grad():  # the fused CPU kernel, which PyTorch's own table does not list
        flops = count_flops(F.scaled_dot_product_attention, q, k, v)
    assert flops == 2 * (2 * 2 * 4 * 7 * 9 * 6)  # q kᵀ and (weights) v


def test_matmul_probe_reports_a_positive_throughput():
    assert matmul_gflops("cpu", size=64, repeats=2) > 0


def test_count_flops_of_an_int8_linear_layer():
    from anomalens.backbones import load_clip
    from anomalens.backbones.clip import _int8_block

    block = load_clip("test-tiny", None).model.visual.transformer.resblocks[0]
    twin = _int8_block(block)
    x = torch.randn(2, 5, block.attn.embed_dim)
    assert count_flops(twin.qkv, x) == 2 * 2 * 5 * block.attn.embed_dim * 3 * block.attn.embed_dim
