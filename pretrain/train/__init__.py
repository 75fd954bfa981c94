"""The training process: start-up (`process`), the loop (`trainer`), the optimizer and
schedule (`optim`), metrics and sinks (`metrics`), preemption and the watchdog
(`resilience`)."""
