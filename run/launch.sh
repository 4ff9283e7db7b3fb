# Sourced by the run scripts after they cd to the repository root: LAUNCH starts one of the CLIs,
# under torchrun with NPROC processes when NPROC > 1 (PYTHON picks the interpreter otherwise).
NPROC=${NPROC:-1}
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC")
else
    LAUNCH=("${PYTHON:-python}")
fi
