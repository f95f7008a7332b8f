"""The plain Python pipeline a user would write for the two bundled models, and ONNX Runtime
alone on pre-made tensors, on a folder of images; prints one JSON line per run.

    .venv/bin/python bench/python_pipeline.py --images DIR --mode pipeline    # (b)
    .venv/bin/python bench/python_pipeline.py --images DIR --mode inference   # (c)

Same models, same preprocessing and postprocessing as models/catalog.yaml (Pillow
bilinear resize, NanoDet GFL decoding + per-class NMS, softmax top-5), one image after the
other, onnxruntime sessions with default options (intra-op threads: one per core).
"""

import argparse
import io
import json
import os
import time

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models")
DET_SIZE = 416
DET_MEAN_BGR = np.array([103.53, 116.28, 123.675], dtype=np.float32)
DET_STD_BGR = np.array([57.375, 57.12, 58.395], dtype=np.float32)
DET_THRESHOLD, DET_IOU, DET_MAX = 0.35, 0.5, 100
CLS_RESIZE, CLS_CROP, TOP_K = 256, 224, 5


def sessions():
    det = ort.InferenceSession(os.path.join(MODELS, "nanodet-coco-416.onnx"), providers=["CPUExecutionProvider"])
    cls = ort.InferenceSession(
        os.path.join(MODELS, "efficientnet-lite0-imagenet.onnx"), providers=["CPUExecutionProvider"]
    )
    return det, cls


def detection_input(image):
    x = np.asarray(image.resize((DET_SIZE, DET_SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    x = (x[..., ::-1] - DET_MEAN_BGR) / DET_STD_BGR
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def classification_input(image):
    w, h = image.size
    if w <= h:
        size = (CLS_RESIZE, round(CLS_RESIZE * h / w))
    else:
        size = (round(CLS_RESIZE * w / h), CLS_RESIZE)
    resized = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - CLS_CROP) // 2, (size[1] - CLS_CROP) // 2
    x = np.asarray(resized.crop((left, top, left + CLS_CROP, top + CLS_CROP)), dtype=np.float32)
    x = (x - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def nms(boxes, scores, iou):
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        xx0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx1 - xx0, 0, None) * np.clip(yy1 - yy0, 0, None)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
        union = area(boxes[i]) + area(boxes[rest]) - inter
        order = rest[inter / np.maximum(union, 1e-9) <= iou]
    return keep


def decode_nanodet(outputs, width, height):
    scores = {o.shape[1]: o[0] for o in outputs if o.shape[2] == 80}
    dists = {o.shape[1]: o[0] for o in outputs if o.shape[2] != 80}
    all_boxes, all_scores, all_classes = [], [], []
    for stride in (8, 16, 32):
        grid = -(-DET_SIZE // stride)
        n = grid * grid
        s, d = scores[n], dists[n]
        cls = s.argmax(axis=1)
        best = s[np.arange(n), cls]
        idx = np.nonzero(best > DET_THRESHOLD)[0]
        if idx.size == 0:
            continue
        bins = d[idx].reshape(-1, 4, 11)
        e = np.exp(bins - bins.max(axis=2, keepdims=True))
        dist = (e * np.arange(11)).sum(axis=2) / e.sum(axis=2) * stride
        cx, cy = (idx % grid) * stride, (idx // grid) * stride
        all_boxes.append(np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], axis=1))
        all_scores.append(best[idx])
        all_classes.append(cls[idx])
    if not all_boxes:
        return []
    boxes, confs, classes = np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_classes)
    results = []
    for c in np.unique(classes):
        m = classes == c
        for i in nms(boxes[m], confs[m], DET_IOU):
            results.append((int(c), float(confs[m][i]), boxes[m][i]))
    results.sort(key=lambda r: -r[1])
    scale = np.array([width / DET_SIZE, height / DET_SIZE] * 2)
    limit = np.array([width, height] * 2)
    return [(c, conf, np.clip(b * scale, 0, limit).round(1).tolist()) for c, conf, b in results[:DET_MAX]]


def top_classes(logits):
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:TOP_K]
    return [(int(i), float(p[i])) for i in top]


def run_pipeline(files, det, cls):
    det_name, cls_name = det.get_inputs()[0].name, cls.get_inputs()[0].name
    for data in files:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        outputs = det.run(None, {det_name: detection_input(image)})
        decode_nanodet(outputs, *image.size)
        top_classes(cls.run(None, {cls_name: classification_input(image)})[0][0])


def run_inference(count, tensors, det, cls):
    det_name, cls_name = det.get_inputs()[0].name, cls.get_inputs()[0].name
    for i in range(count):
        det_input, cls_input = tensors[i % len(tensors)]
        det.run(None, {det_name: det_input})
        cls.run(None, {cls_name: cls_input})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    parser.add_argument("--mode", choices=["pipeline", "inference"], default="pipeline")
    parser.add_argument("--warmup", type=int, default=8)
    args = parser.parse_args()
    names = sorted(os.listdir(args.images))
    files = []
    for name in names:
        with open(os.path.join(args.images, name), "rb") as f:
            files.append(f.read())
    det, cls = sessions()
    if args.mode == "pipeline":
        run_pipeline(files[: args.warmup], det, cls)
        started = time.perf_counter()
        run_pipeline(files, det, cls)
        name = "python-pipeline"
    else:
        tensors = []
        for data in files[:16]:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            tensors.append((detection_input(image), classification_input(image)))
        run_inference(args.warmup, tensors, det, cls)
        started = time.perf_counter()
        run_inference(len(files), tensors, det, cls)
        name = "python-onnxruntime-only"
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "name": name,
                "images": len(files),
                "seconds": seconds,
                "images_per_second": len(files) / seconds,
                "intra_threads": "onnxruntime default",
            }
        )
    )


if __name__ == "__main__":
    main()
