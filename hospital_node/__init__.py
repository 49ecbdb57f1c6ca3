"""Hospital node: reads, validates, preprocesses and caches one hospital's data (and, later, the
Flower ClientApp that trains on it). Patient data never leaves this package's process except as
model weights and aggregate counts."""
