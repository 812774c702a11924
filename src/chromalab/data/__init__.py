"""The data stages: download → split → images → tfrecords, and the readers of what they write."""
