"""The built-in recipes, registered through the same hook as a third party's."""

import bitsweep
from bitsweep.recipes import Pipeline


@bitsweep.hookimpl
def register_recipes():
    return [
        Pipeline("mse", "per-row clipping that minimises the weights' squared rounding error", clip_p=2.0),
        Pipeline("bias", "plain rounding, then DFQ bias correction from BatchNorm-matched synthetic inputs",
                 bias_correction="layer"),
        Pipeline("bias-seq", "plain rounding, then sequential bias correction: each layer's output mean "
                 "matched to fp32 with the shifts upstream included", bias_correction="sequential"),
        Pipeline("fold", "BatchNorm folded into the conv weights before plain rounding", fold=True),
        Pipeline("cle", "BatchNorm folding and cross-layer equalization (ReLU/ReLU6, depthwise chains)",
                 equalize=True),
        Pipeline("mse-bias", "mse clipping, then bias correction", clip_p=2.0, bias_correction="layer"),
        Pipeline("mse-bias-seq", "mse clipping, then sequential bias correction", clip_p=2.0,
                 bias_correction="sequential"),
        Pipeline("gptq", "GPTQ error-feedback rounding, the layers' input statistics from BatchNorm-matched "
                 "synthetic inputs", error_feedback=True),
        Pipeline("gptq-bias", "gptq, then bias correction", error_feedback=True, bias_correction="layer"),
        Pipeline("gptq-bias-tune", "gptq-bias, then the biases and norm parameters trained towards the fp32 "
                 "model's outputs on the synthetic inputs (models with BatchNorm)", error_feedback=True,
                 bias_correction="layer", tune=True),
        Pipeline("bias-tune", "bias, then the biases and norm parameters trained towards the fp32 model's outputs",
                 bias_correction="layer", tune=True),
        Pipeline("mse-gptq", "mse clipping for the grid, then gptq on it", clip_p=2.0, error_feedback=True),
        Pipeline("adaround", "AdaRound: BatchNorm folded, then each weight rounded down or up as learned, layer by "
                 "layer in model order, so that the layer's output on what the quantized layers before it pass on "
                 "matches fp32's (BatchNorm-matched synthetic inputs)", fold=True, learned_rounding=True),
        Pipeline("adaround-bias", "adaround, then bias correction", fold=True, learned_rounding=True,
                 bias_correction="layer"),
        Pipeline("brecq", "BRECQ: BatchNorm folded, then AdaRound's learned rounding for the layers of each residual "
                 "block together, so that the block's output on what the quantized blocks before it pass on matches "
                 "fp32's (a layer in no block, such as a stem or head, alone)", fold=True, learned_rounding=True,
                 blocks=True),
        Pipeline("brecq-bias", "brecq, then bias correction", fold=True, learned_rounding=True, blocks=True,
                 bias_correction="layer"),
        Pipeline("mse-adaround-bias", "mse clipping for the grid, then adaround on it and bias correction",
                 fold=True, clip_p=2.0, learned_rounding=True, bias_correction="layer"),
        Pipeline("dfq", "folding, equalization, mse clipping and bias correction", equalize=True, clip_p=2.0,
                 bias_correction="layer"),
    ]
