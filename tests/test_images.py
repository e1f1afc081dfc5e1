import torch

from analysis.images import to_display


def test_to_display_enlarges_with_crisp_pixels():
    images = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).expand(1, 3, 2, 2)
    picture = to_display(images, size=9)[0]
    assert picture.size == (8, 8)  # 9 // 2 = 4 times
    assert picture.getpixel((3, 0)) == (0, 0, 0) and picture.getpixel((4, 0)) == (255, 255, 255)
    assert to_display(torch.zeros(1, 3, 64, 64), size=32)[0].size == (64, 64)  # never shrunk
