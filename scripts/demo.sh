#!/usr/bin/env bash
# `make demo`: the main job on the shipped samples, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo_out
rm -rf "$OUT" && mkdir -p "$OUT"
run() { printf '\n$ %s\n' "$*"; "$@"; }

# The seed case: Linear(4000 -> 64) trained on flattened 20x20x10 patches.
run "$BIN/fcconv" inspect sample_checkpoints/seed_fc.pt
run "$BIN/fcconv" convert sample_checkpoints/seed_fc.pt -o "$OUT/seed_fc.conv.pt" \
    --layer fc --patch 20x20x10 --input 100x60
run "$BIN/fcconv" verify sample_checkpoints/seed_fc.pt "$OUT/seed_fc.conv.pt" --input 100x60

# Load the new weights into the module fcconv printed and run it on 100x60.
printf '\n$ python: load %s into nn.Conv2d and run a 100x60x10 input\n' "$OUT/seed_fc.conv.pt"
"$BIN/python" - "$OUT/seed_fc.conv.pt" <<'PY'
import sys
import torch
from torch import nn

conv = nn.Conv2d(10, 64, kernel_size=(20, 20), stride=(20, 20), padding=0, bias=True)
state = torch.load(sys.argv[1], weights_only=True)
conv.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
scores = conv(torch.randn(1, 10, 100, 60))
print(f"local-response map: {tuple(scores.shape)} = batch x 64 scores x 5 x 3 windows")
PY

# A two-layer head in safetensors: fc6 on 6x6x8 patches, fc7 pointwise; provenance kept.
run "$BIN/fcconv" convert sample_checkpoints/head_fc6_fc7.safetensors -o "$OUT/head.conv.safetensors" \
    --layer fc6=6x6x8 --layer fc7=1x1 --stride 2x2 --input 14x14
run "$BIN/fcconv" verify sample_checkpoints/head_fc6_fc7.safetensors "$OUT/head.conv.safetensors"

# A 1-D head (Conv1d: fc1 on 16 steps of 32 channels, fc2 pointwise) and a 3-D one (Conv3d).
run "$BIN/fcconv" convert sample_checkpoints/seq_head.safetensors -o "$OUT/seq_head.conv.safetensors" \
    --layer fc1=16 --layer fc2=1 --order lc --input 128
run "$BIN/fcconv" verify sample_checkpoints/seq_head.safetensors "$OUT/seq_head.conv.safetensors"
run "$BIN/fcconv" convert sample_checkpoints/clip_head.safetensors -o "$OUT/clip_head.conv.safetensors" \
    --layer fc=2x3x3x8 --order dhwc --stride 1 --input 4x8x8

# The flatten order from the weights: a head trained on NHWC features.
run "$BIN/fcconv" inspect sample_checkpoints/trained_nhwc.pt --patch 6x4x16
run "$BIN/fcconv" convert sample_checkpoints/trained_nhwc.pt -o "$OUT/trained_nhwc.conv.pt" \
    --layer fc --patch 6x4x16 --order auto --no-verify

# A whole classifier made fully convolutional, saved as a torch.export program.
run "$BIN/fcconv" convolutionalize sample_checkpoints/tiny_vgg.safetensors \
    --arch fcconv.samples_models:tiny_vgg --input 32x32 -o "$OUT/tiny_vgg.pt2"
printf '\n$ python: torch.export.load(%s) on a 64x48 input\n' "$OUT/tiny_vgg.pt2"
"$BIN/python" -c "
import sys, torch
model = torch.export.load(sys.argv[1]).module()
print('class-score map:', tuple(model(torch.randn(1, 3, 64, 48)).shape), '= batch x 10 classes x 5 x 3 windows')
" "$OUT/tiny_vgg.pt2"

# A Keras 3 model (Conv2D -> MaxPooling2D -> Flatten -> Dense -> Dense): the head is read
# off its config; the converted .keras model is run in Keras before it is written.
run "$BIN/fcconv" convert sample_checkpoints/keras_cnn.keras -o "$OUT/keras_cnn.conv.keras"
run "$BIN/fcconv" verify sample_checkpoints/keras_cnn.keras "$OUT/keras_cnn.conv.keras"
printf '\n$ python: keras.saving.load_model(%s) on a 50x38 input\n' "$OUT/keras_cnn.conv.keras"
KERAS_BACKEND=torch KERAS_HOME="$OUT/keras_home" "$BIN/python" -W ignore -c "
import sys, numpy as np, keras
model = keras.saving.load_model(sys.argv[1])
print('class-score map:', tuple(model(np.zeros((1, 50, 38, 3), 'float32')).shape), '= batch x 3 x 3 windows x 10 classes')
" "$OUT/keras_cnn.conv.keras"

# An ONNX classifier exported from PyTorch: Flatten -> Gemm becomes Conv, verified in onnxruntime.
run "$BIN/fcconv" convolutionalize sample_checkpoints/tiny_cnn.onnx -o "$OUT/tiny_cnn.dense.onnx"
printf '\n$ python: onnxruntime on %s with a 40x32 input\n' "$OUT/tiny_cnn.dense.onnx"
"$BIN/python" -c "
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
scores = session.run(None, {'image': np.zeros((1, 3, 40, 32), 'float32')})[0]
print('class-score map:', scores.shape, '= batch x 5 classes x 13 x 9 windows')
" "$OUT/tiny_cnn.dense.onnx"
# The docs' walk-through (docs/guide/models.md): a two-headed detector stage (face scores and boxes) made dense
# together; each output's coordinate map travels in the program's metadata.
run "$BIN/fcconv" convolutionalize sample_checkpoints/detector_stage.safetensors \
    --arch 'fcconv.samples_models:detector_stage(width=16, hidden=64)' --input 24x24 \
    -o "$OUT/detector.pt2"
printf '\n$ python: torch.export.load(%s) on a 40x32 image, the best face cell and its box\n' "$OUT/detector.pt2"
"$BIN/python" - "$OUT/detector.pt2" <<'PY'
import json
import sys

import torch

from fcconv.geometry import CellGeometry

extra = {"fcconv.json": ""}
dense = torch.export.load(sys.argv[1], extra_files=extra).module()
cells = CellGeometry(**json.loads(extra["fcconv.json"])["outputs"][0]["cells"])
maps = dense(torch.randn(1, 3, 40, 32))
print({name: tuple(m.shape) for name, m in maps.items()})
faces = maps["face"][0, 1]
p, q = divmod(int(faces.argmax()), faces.shape[1])
print(f"best face cell {(p, q)} reads the image box {cells.box(p, q)}")
PY

# Pictures: a blob classifier (trunk stride 32) made dense, then denser at stride 8 by
# shift-and-stitch (every cell verified, its cost reported), each map drawn over an image.
run "$BIN/fcconv" convolutionalize sample_checkpoints/blob_net.safetensors \
    --arch fcconv.samples_models:blob_net --input 96x96 -o "$OUT/blobs.pt2"
run "$BIN/fcconv" convolutionalize sample_checkpoints/blob_net.safetensors \
    --arch fcconv.samples_models:blob_net --input 96x96 -o "$OUT/blobs_s8.pt2" --output-stride 8
run "$BIN/fcconv" map "$OUT/blobs.pt2" sample_checkpoints/blobs.png -o "$OUT/map.png" --channel 0
run "$BIN/fcconv" map "$OUT/blobs_s8.pt2" sample_checkpoints/blobs.png -o "$OUT/map_s8.png" --channel 0
