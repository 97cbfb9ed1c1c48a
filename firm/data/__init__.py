"""Sample schemas, shard writing/reading and LightningDataModules. Imports nothing from `firm`."""
