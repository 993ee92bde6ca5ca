#!/usr/bin/env bash
# Make sure the default data set, Fashion-MNIST, can be loaded: Debian's package where apt
# and root are available, otherwise the Hub through `datasets`, otherwise say what to do.
set -u
python=${1:-python3}
idx=train-images-idx3-ubyte.gz
for dir in "${VQ_DATA_DIR:-}" /usr/share/datasets/fashion-mnist; do
    if [ -n "$dir" ] && [ -f "$dir/$idx" ]; then echo "Fashion-MNIST: $dir"; exit 0; fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
        echo "Fashion-MNIST: installed Debian's dataset-fashion-mnist"; exit 0
    fi
fi
if "$python" -c "import datasets; datasets.load_dataset('zalando-datasets/fashion_mnist')" >/dev/null 2>&1; then
    echo "Fashion-MNIST: cached from the Hub (zalando-datasets/fashion_mnist)"; exit 0
fi
echo "Fashion-MNIST is not available: run 'sudo apt-get install dataset-fashion-mnist', or connect to the internet so that datasets can fetch zalando-datasets/fashion_mnist, or set VQ_DATA_DIR to a folder holding its four IDX .gz files." >&2
exit 1
