"""Pure decisions: no I/O, no clock, no globals. Everything here is tested on its own."""
