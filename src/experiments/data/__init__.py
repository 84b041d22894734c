"""Images in: class folders scanned and checked, decoded once (in memory or a disk cache), split
by patient or stratified, batched by tf.data with augmentation; stain normalisation,
native-resolution patches and the synthetic demo set."""
