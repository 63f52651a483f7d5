"""The small CNN of PyTorch's MNIST example, on 1 x 28 x 28 inputs: the benchmark's light model.

conv(1,32,3)-relu-conv(32,64,3)-relu-maxpool2-fc(9216,128)-relu-fc(128,10).
"""

import torch
from torch import nn


class MnistCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))
