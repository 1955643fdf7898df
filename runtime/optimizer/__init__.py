"""The optimizer step: bucketed gradient reduction, ZeRO-1 AdamW (GPU or host-offloaded), the lr schedule."""
