"""The reference's built-in A-SINQ calibration prompts (data).

Copied verbatim from ``get_simple_calibration_data`` in ``sinq/awq.py`` of the reference
SINQ implementation (huawei-csl/SINQ, PyPI ``sinq==0.2.0``; Apache License 2.0, written
by the SINQ authors). They are the default A-SINQ calibration set of ``sinq-vllm quantize
--method asinq``: with the same token blocks, our A-SINQ tensors equal the reference's
(docs/format.md §1.5). Each string keeps its exact bytes, including the indentation the
original source gives every line after the first; ``tests/test_asinq.py`` checks them
against the installed reference.
"""

PROMPTS: tuple[str, ...] = (
    (
        '- Fiction: "In a hidden valley where time moved slower, an old painter discovered a brush that could bring his creations to life. His first stroke awoke something unexpected..."\n'
        '    - News: "A rare celestial event—a triple conjunction of Jupiter, Saturn, and Mars—will be visible tonight for the first time in over 200 years. Astronomers urge skywatchers not to miss..."\n'
        '    - Code: `const countVowels = (str) => [...str].filter(c => "aeiou".includes(c.toLowerCase())).length;\n'
        'console.log(countVowels("Hello, world!"));`\n'
        "    - Math: A car travels 240 km in 3 hours at constant speed. If it then accelerates by 20 km/h for the next 2 hours, what's the total distance traveled?\n"
        '    - Facts: "The Great Wall of China is approximately 21,196 km long. However, contrary to myth, it cannot be seen from space with the naked eye..."\n'
        '    - Fiction: "The last tree in the desert city whispered secrets to those who listened. When a young girl finally understood its language, she discovered it held the blueprint to regrow the entire forest..."\n'
        '    - News: "Scientists develop biodegradable battery that decomposes in soil after 30 days, offering potential solution to electronic waste pollution..."\n'
        '    - Code: `def fibonacci(n):\n'
        '    a, b = 0, 1\n'
        '    for _ in range(n):\n'
        '        print(a)\n'
        '        a, b = b, a + b`\n'
        '    - Math: Find the area of a triangle with vertices at (2,3), (5,7), and (9,4) using the determinant formula\n'
        '    - Facts: "Octopuses have three hearts and blue blood. Two hearts pump blood to the gills while the third circulates it to the rest of the body..."\n'
        '    '
    ),
    (
        '- Fiction: "When the stars aligned, a librarian in Prague found every book in the library rearranged into an unknown language—except one, which bore her name on the cover..."\n'
        '    - News: "New legislation bans single-use plastics in the European Union, with critics arguing the policy doesn\'t address industrial waste, while proponents hail it as a critical first step..."\n'
        '    - Code: `import numpy as np\n'
        'arr = np.array([1, 2, 3])\n'
        'print(arr * 2)`\n'
        '    - Math: (14.6 * 3.2) - (5.9 ** 2) + (18 / 1.8) =\n'
        '    - Facts: "The male seahorse carries and gives birth to its young. Females deposit eggs into the male\'s pouch, where they are fertilized and nurtured until birth..."\n'
        '    - Fiction: "Every full moon, the antique shop\'s items would rearrange themselves. The owner kept meticulous records until he noticed a pattern that predicted future events with uncanny accuracy..."\n'
        '    - News: "Global coral bleaching event declared as ocean temperatures reach record highs, threatening marine ecosystems worldwide..."\n'
        '    - Code: `from collections import defaultdict\n'
        'd = defaultdict(int)\n'
        'for word in text.split():\n'
        '    d[word] += 1`\n'
        '    - Math: Solve the quadratic equation: 2x² - 7x + 3 = 0\n'
        '    - Facts: "Honey never spoils. Archaeologists have found pots of honey in ancient Egyptian tombs that are over 3,000 years old and still perfectly edible..."\n'
        '    '
    ),
    (
        '- Fiction: "A lighthouse keeper on a remote island noticed the beacon dimming each night, replaced by a faint chorus of voices singing in unison—until one evening, they called his name..."\n'
        '    - News: "AI-designed proteins could revolutionize medicine, with researchers announcing the creation of molecules that target previously \'undruggable\' diseases..."\n'
        '    - Code: `class Cat:\n'
        '  def __init__(self, name):\n'
        '    self.name = name\n'
        '  def speak(self):\n'
        '    return f"{self.name} says \'Meow!\'"`\n'
        '    - Math: If 3x + 5 = 20, what is the value of x² - 2x?\n'
        '    - Facts: "Venus rotates backward compared to most planets in the solar system, meaning its sun rises in the west and sets in the east..."\n'
        '    - Fiction: "The clockmaker\'s final creation could manipulate time itself. But when he tried to undo his greatest regret, he discovered why some moments were meant to remain unchanged..."\n'
        '    - News: "Breakthrough in quantum computing: Researchers achieve quantum supremacy with 128-qubit processor, solving problems previously thought impossible..."\n'
        '    - Code: `const debounce = (func, delay) => {\n'
        '  let timeout;\n'
        '  return (...args) => {\n'
        '    clearTimeout(timeout);\n'
        '    timeout = setTimeout(() => func.apply(this, args), delay);\n'
        '  };\n'
        '};`\n'
        '    - Math: Calculate the volume of a sphere with radius 5 cm (V = 4/3πr³)\n'
        '    - Facts: "A single strand of spider silk is stronger than steel of the same diameter and can stretch up to five times its length without breaking..."\n'
        '    '
    ),
    (
        '- Fiction: "In a village where every resident shared the same dream nightly, a child was born who dreamed of nothing—until the others\' dreams began vanishing one by one..."\n'
        '    - News: "SpaceX successfully landed a reusable rocket on its tenth flight, setting a new milestone for cost efficiency in space exploration..."\n'
        '    - Code: `list(map(lambda x: x**2, filter(lambda x: x % 2 == 0, [1, 2, 3, 4])))`\n'
        '    - Math: (7! / (4! * 3!)) + (√144 * 2³) =\n'
        '    - Facts: "A group of flamingos is called a \'flamboyance.\' These birds often balance on one leg to conserve body heat..."\n'
        '    - Fiction: "The museum\'s newest exhibit—a perfectly preserved Victorian doll—began appearing in visitors\' dreams with whispered warnings that always came true the next day..."\n'
        '    - News: "Researchers discover new species of deep-sea fish that glows with bioluminescent patterns never before documented in marine biology..."\n'
        '    - Code: `using System.Linq;\n'
        'var evenNumbers = numbers.Where(n => n % 2 == 0).ToList();`\n'
        '    - Math: Find the derivative of f(x) = 3x⁴ - 2x³ + 7x - 5\n'
        '    - Facts: "The shortest war in history lasted only 38 minutes. It occurred in 1896 between Britain and Zanzibar when the Sultan\'s forces surrendered after a brief naval bombardment..."\n'
        '    '
    ),
    (
        '- Fiction: "A detective specializing in \'impossible crimes\' received a letter postmarked from 1942. The handwriting matched her own—but she hadn\'t been born yet..."\n'
        '    - News: "Archaeologists uncovered a 1,500-year-old mosaic beneath a vineyard in Italy, depicting scenes from Greek mythology in near-perfect condition..."\n'
        '    - Code: `String reverse(String s) {\n'
        '  return new StringBuilder(s).reverse().toString();\n'
        '}`\n'
        '    - Math: (log₁₀1000 * 5²) - (e³ / ln(20)) ≈ (round to two decimal places)\n'
        '    - Facts: "Sharks have been around longer than trees. The earliest shark fossils date back 400 million years, while trees appeared roughly 350 million years ago..."\n'
        '    - Fiction: "The bookstore that only appeared during rainstorms contained volumes written by authors from parallel universes. One rainy Tuesday, a customer found a book with their life story—but with a different ending..."\n'
        '    - News: "World\'s first successful transplant of 3D-printed functional organ performed, marking major advancement in regenerative medicine..."\n'
        '    - Code: `function deepClone(obj) {\n'
        '  return JSON.parse(JSON.stringify(obj));\n'
        '}`\n'
        '    - Math: Calculate the compound interest on $10,000 at 5% annual rate compounded quarterly for 3 years\n'
        '    - Facts: "The human nose can detect over 1 trillion different scents, far more than the previously believed 10,000 scents..."\n'
        '    '
    ),
)
