//! The fixed rewards: JPEG compressibility (DDPO's), the gold evaluator and weighted sums.

use tiller_reward::rewards::jpeg_size;
use tiller_reward::{GoldReward, JpegCompressibility, Reward, WeightedSum};
use tiller_testbed::prompts::PromptSpec;
use tiller_testbed::{Image, Prompt, RenderConfig, render_prompt};

fn noisy(seed: u64) -> Image {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let data = (0..32 * 32 * 3)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    Image::from_rgb(32, 32, data).unwrap()
}

#[test]
fn jpeg_reward_is_minus_kilobytes_and_prefers_flat_images() {
    let flat = Image::filled(32, 32, [40, 40, 40]);
    let busy = noisy(3);
    let prompts = vec!["a red circle".to_string(); 2];
    let s = JpegCompressibility
        .score(&[flat.clone(), busy.clone()], &prompts)
        .unwrap();
    assert_eq!(s[0], -(jpeg_size(&flat, 95).unwrap() as f64) / 1000.0);
    assert_eq!(s[1], -(jpeg_size(&busy, 95).unwrap() as f64) / 1000.0);
    assert!(s[0] > s[1], "{s:?}");
    assert!(JpegCompressibility.differentiable().is_none());
    // Images and prompts must pair up.
    assert!(JpegCompressibility.score(&[flat], &prompts).is_err());
}

#[test]
fn weighted_sum_is_linear() {
    let images = [Image::filled(32, 32, [40, 40, 40]), noisy(5)];
    let prompts = vec!["a red circle".to_string(); 2];
    let one = JpegCompressibility.score(&images, &prompts).unwrap();
    let sum = WeightedSum {
        parts: vec![
            (2.0, Box::new(JpegCompressibility)),
            (-0.5, Box::new(JpegCompressibility)),
        ],
    };
    for (a, b) in sum.score(&images, &prompts).unwrap().iter().zip(&one) {
        assert!((a - 1.5 * b).abs() < 1e-12);
    }
    assert!(sum.differentiable().is_none());
}

#[test]
fn gold_reward_prefers_the_prompt_rendered_over_an_empty_image() {
    let text = "a red circle";
    let prompt = Prompt {
        spec: PromptSpec::parse(text).unwrap(),
        text: text.into(),
    };
    let drawn = render_prompt(&prompt, &RenderConfig::default(), 1)
        .unwrap()
        .image;
    let empty = Image::filled(32, 32, [40, 40, 40]);
    let gold = GoldReward::default();
    let prompts = vec![text.to_string(); 2];
    let s = gold
        .score(&[drawn.clone(), empty.clone()], &prompts)
        .unwrap();
    let e = gold.evaluate(&[drawn, empty], &prompts).unwrap();
    // The empty image asks nothing of the correct flag or the alignment factors: only the
    // aesthetic term remains.
    assert!(!e[1].correct);
    assert!(
        (s[1] - 0.25 * e[1].parsed.aesthetics.overall).abs() < 1e-12,
        "{s:?}"
    );
    assert!(s[0] > s[1] + 0.5, "{s:?}");
    // An unknown word is an error naming it.
    let err = gold
        .score(
            &[Image::filled(32, 32, [40, 40, 40])],
            &["a red hexagon".into()],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("hexagon"), "{err}");
}
