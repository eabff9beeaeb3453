"""NPU blocks.

* :mod:`.isa` -- the matrix unit's instruction table (layouts, opcodes, error codes, encoder).
* :mod:`.systolic` -- processing element and weight-stationary systolic array (dataflow, cycle arithmetic).
* :mod:`.spm` -- scratchpads (``lib.memory``).
* :mod:`.dma` -- 2-D strided DMA engines (load with optional transpose, store as FP32/BF16) and the
  memory-port arbiter.
* :mod:`.matrix_unit` -- compute engine and the matrix unit top (queues, dependency tokens, checks,
  counters).
* :mod:`.memmodel` -- fixed-latency memory model behind the unified-memory interface, and the test
  system.
"""
