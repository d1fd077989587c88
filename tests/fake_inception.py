"""A tiny stand-in for the 2015 Inception graph, for tests that must not download it."""

import numpy as np

from cfg_guidance.evaluation import inception

DIM, CLASSES = inception.FEATURE_DIM, inception.NUM_LOGITS
# mixed_6/conv is [N, 17, 17, 192] in the real graph; 8 channels show that sFID keeps 7.
SPATIAL_SIZE, SPATIAL_CHANNELS = 17, 8


def spatial_projection(seed=0):
  """[3, 8] 1×1 convolution that makes the fake graph's mixed_6/conv from the image."""
  return np.random.default_rng([seed, 1]).normal(size=(3, SPATIAL_CHANNELS)).astype(
      np.float32)


def write_graph(directory, seed=0, active_dims=None):
  """Writes DIRECTORY/classify_image_graph_def.pb: (path, proj [3, D], weights [D, K]).

  A GraphDef with the real graph's tensor names and a checkable computation. Like the
  2015 graph: DecodeJpeg → Cast → ExpandDims (batch 1) → ResizeBilinear to 299² →
  (x − 128)/128; then pool_3 = spatial mean · proj (a linear stand-in for the network)
  and softmax(pool_3 @ weights + b), with the [1, 2048] reshape that pins the real
  graph's own logits to batch 1; mixed_6/conv = ResizeBilinear of that to 17² followed
  by the 1×1 convolution `spatial_projection(seed)`.

  With `active_dims`, only the first `active_dims` features are non-zero (proj's other
  columns are 0). Features of a few images span only a few directions either way, and
  scipy's sqrtm of such a rank-deficient 2048² product (FID) takes 10-90 s on 2 cores,
  erratically; with zero columns it takes a steady ~8 s.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  proj = rng.normal(size=(3, DIM)).astype(np.float32)
  if active_dims is not None:
    proj[:, active_dims:] = 0
  weights = (rng.normal(size=(DIM, CLASSES)) / 40).astype(np.float32)
  bias = rng.normal(size=CLASSES).astype(np.float32)
  graph = tf.Graph()
  with graph.as_default():
    contents = tf.compat.v1.placeholder(tf.string, [], name="DecodeJpeg/contents")
    decoded = tf.io.decode_jpeg(contents, channels=3, name="DecodeJpeg")
    x = tf.expand_dims(tf.cast(decoded, tf.float32, name="Cast"), 0, name="ExpandDims")
    x = tf.compat.v1.image.resize_bilinear(x, [299, 299], name="ResizeBilinear")
    x = tf.multiply(tf.subtract(x, 128.0, name="Sub"), 1 / 128, name="Mul")
    small = tf.compat.v1.image.resize_bilinear(x, [SPATIAL_SIZE] * 2)
    tf.nn.conv2d(small, spatial_projection(seed)[None, None], 1, "VALID",
                 name="mixed_6/conv")
    pooled = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    pool3 = tf.identity(tf.nn.conv2d(pooled, proj[None, None], 1, "VALID"), name="pool_3")
    flat = tf.reshape(pool3, [1, DIM], name="pool_3/_reshape")
    logits = tf.matmul(flat, tf.constant(weights, name="softmax/weights"),
                       name="softmax/logits/MatMul")
    logits = tf.nn.bias_add(logits, tf.constant(bias, name="softmax/biases"),
                            name="softmax/logits")
    tf.nn.softmax(logits, name="softmax")
  path = directory / inception.GRAPH_FILENAME
  path.write_bytes(graph.as_graph_def().SerializeToString())
  return path, proj, weights
