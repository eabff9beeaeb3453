"""NPU blocks: matrix unit, scratchpads, DMA, vector unit."""
