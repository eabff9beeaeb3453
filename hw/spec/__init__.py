"""Specifications shared by the hardware, the firmware and the models: tables, encoders, decoders, numerics.

Nothing here imports the rest of the project (``tests/test_architecture.py`` checks it), so the RTL
(``hw/``), the firmware (``firmware/``) and the models (``sim/``) can all read it without importing each
other:

* :mod:`hw.spec.soc_isa`: the SoC instruction set (command-processor program format);
* :mod:`hw.spec.soc_regs`: the SoC's AXI4-Lite register table;
* :mod:`hw.spec.matrix_isa`: the matrix unit's instruction set (Amaranth layouts, encode / decode);
* :mod:`hw.spec.vector_isa`: the vector unit's instruction set (opcode table, instruction layout, encode);
* :mod:`hw.spec.macro`: macro PIM commands (encode / decode), the prototype's register map;
* :mod:`hw.spec.fp`: the BF16 / FP32 numerics contract, bit for bit (numpy + ml_dtypes).
"""
