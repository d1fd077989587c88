"""Inception-v3 features, spatial features and logits from the 2015 graph: FID, sFID, IS.

The graph is `classify_image_graph_def.pb` from inception-2015-12-05.tgz, the file
that TTUR's fid.py (FID) and OpenAI's improved-gan inception_score.py (IS) run, so
the numbers are comparable with the literature. Tensors used, as in that code:

  "ExpandDims:0"          input, float32 [N, H, W, 3] in [0, 255]; the graph itself
                          resizes to 299×299 (ResizeBilinear) and scales to [−1, 1].
  "pool_3:0"              [N, 1, 1, 2048] features for FID (TTUR).
  "mixed_6/conv:0"        [N, 17, 17, 192]; its first 7 channels, flattened in NHWC
                          order (17·17·7 = 2023), are sFID's features, as in
                          openai/guided-diffusion's evaluations/evaluator.py, so its
                          reference batches' mu_s/sigma_s apply.
  "softmax/logits/MatMul" its second input is the [2048, 1008] weight matrix;
                          improved-gan's IS uses logits = pool_3 @ W, without the
                          softmax bias, and so do we.

Nothing is downloaded: the user fetches the tarball and points `eval.inception_path`
at the extracted .pb file (or the folder holding it). TensorFlow is imported lazily.
"""

import os

from etils import epath
import numpy as np

from cfg_guidance.runtime import backend

INCEPTION_URL = ("http://download.tensorflow.org/models/image/imagenet/"
                 "inception-2015-12-05.tgz")
GRAPH_FILENAME = "classify_image_graph_def.pb"
_PURPOSE = "The Inception extractor (config.eval.extractor='inception')"
INPUT_TENSOR = "ExpandDims:0"
POOL3_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
LOGITS_MATMUL_OP = "softmax/logits/MatMul"
FEATURE_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


def resolve_graph_path(path):
  """The .pb file that `path` (the file, or the folder holding it) names."""
  if not path:
    raise ValueError(
        "eval.inception_path is empty. Set it to classify_image_graph_def.pb from "
        f"{INCEPTION_URL} (download and extract it yourself; nothing is fetched).")
  path = epath.Path(path)  # Local, gs:// or any other epath scheme.
  if path.is_dir():
    path = path / GRAPH_FILENAME
  path = os.fspath(path)
  if not epath.Path(path).is_file():
    raise FileNotFoundError(
        f"No Inception graph at eval.inception_path={path!r}. It is "
        f"{GRAPH_FILENAME} inside the public tarball {INCEPTION_URL}; download and "
        "extract it (e.g. `curl -L URL | tar xz`) and point eval.inception_path at "
        "the file or its folder. Nothing is downloaded automatically.")
  return path


def _load_graph_def(path):
  tf = backend.tensorflow(_PURPOSE)
  graph_def = tf.compat.v1.GraphDef()
  with epath.Path(path).open("rb") as f:
    try:
      graph_def.ParseFromString(f.read())
    except Exception as e:  # protobuf's DecodeError has no stable public import path
      raise ValueError(f"eval.inception_path={path!r} is not a GraphDef "
                       f"(.pb) file: {e}") from e
  names = {node.name for node in graph_def.node}
  for tensor in (INPUT_TENSOR, POOL3_TENSOR, SPATIAL_TENSOR, LOGITS_MATMUL_OP):
    if tensor.split(":")[0] not in names:
      raise ValueError(f"eval.inception_path={path!r} has no node "
                       f"{tensor.split(':')[0]!r}; is it {GRAPH_FILENAME}?")
  return graph_def


class InceptionExtractor:
  """`extractor(images) -> (features [N, 2048], logits [N, 1008])`, float32 numpy.

  With `spatial=True`, also sFID's spatial features [N, 2023] (a third output).
  images: uint8 [N, H, W, 3] (or [N, H, W, 1], repeated to RGB), any N, H, W.
  Runs `batch_size` images per call of the graph.
  """

  name = "inception-2015-12-05"
  comparable = True  # the literature's network: metrics get their bare names
  spatial_dim = SPATIAL_DIM

  def __init__(self, path, *, batch_size=100):
    tf = backend.tensorflow(_PURPOSE)
    self.path = resolve_graph_path(path)
    self.batch_size = batch_size
    graph_def = _load_graph_def(self.path)

    def forward(images):
      # Feeding ExpandDims directly skips the JPEG decoder, as TTUR and improved-gan
      # do; mapping it to a [None, ...] input frees the graph's batch size of 1.
      pool3, mixed6, matmul = tf.compat.v1.import_graph_def(
          graph_def, input_map={INPUT_TENSOR: images},
          return_elements=[POOL3_TENSOR, SPATIAL_TENSOR, LOGITS_MATMUL_OP],
          name="inception")
      features = tf.reshape(pool3, [-1, FEATURE_DIM])
      spatial = tf.reshape(mixed6[..., :SPATIAL_CHANNELS], [-1, SPATIAL_DIM])
      return features, tf.matmul(features, matmul.inputs[1]), spatial

    # The JPEG decoder and its string placeholder stay in the function's graph but
    # never run: the runtime prunes what the outputs do not need.
    self._forward = tf.compat.v1.wrap_function(
        forward, [tf.TensorSpec([None, None, None, 3], tf.float32)])

  def __call__(self, images, *, spatial=False):
    tf = backend.tensorflow(_PURPOSE)
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 in [0, 255]; got dtype {images.dtype}.")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be [N, H, W, 3] or [N, H, W, 1]; got {images.shape}.")
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    outputs = [[] for _ in range(3)]
    for start in range(0, images.shape[0], self.batch_size):
      batch = images[start:start + self.batch_size].astype(np.float32)
      for kept, value in zip(outputs, self._forward(tf.constant(batch))):
        kept.append(value.numpy())
    dims = (FEATURE_DIM, NUM_LOGITS, SPATIAL_DIM)
    outputs = tuple(np.concatenate(kept) if kept else np.zeros((0, dim), np.float32)
                    for kept, dim in zip(outputs, dims))
    return outputs if spatial else outputs[:2]
