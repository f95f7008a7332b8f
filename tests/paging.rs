//! Paging of a group's images on `GET /v1/image-groups/{id}` (the other lists, deliveries,
//! are paged by tests/e2e.rs): `limit` and the `nextCursor` handed out walk every image once,
//! in the group's order, each with its results; a cursor the API did not hand out for this
//! group (position and image id), a bad `limit` or a filter the list does not take are 400 problems.

mod common;

crate::real_node_tests!(a_groups_images_come_in_pages);

use std::time::Duration;

use common::Harness;
use serde_json::Value;

async fn a_groups_images_come_in_pages() {
    let h = Harness::start("tenant-paging").await;
    let models: Vec<&str> = h.models.iter().map(String::as_str).collect();
    let group = h.post_photo_group(5, &models, &h.hook_url).await;
    common::eventually("the group completes", Duration::from_secs(90), async || {
        h.get(&format!("/v1/image-groups/{group}")).await.1["status"] == "completed"
    })
    .await;

    // Without `limit`, a default page (100) holds all five.
    let (status, whole) = h.get(&format!("/v1/image-groups/{group}")).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["images"].as_array().map(Vec::len), Some(5));
    assert_eq!(whole["nextCursor"], Value::Null);
    assert_eq!(whole["links"]["next"], Value::Null);

    // Pages of two, by the cursor and by the next link alike.
    let mut ids = Vec::new();
    let mut sizes = Vec::new();
    let mut path = format!("/v1/image-groups/{group}?limit=2");
    let mut by_link = false;
    loop {
        let (status, page) = h.get(&path).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["imagesTotal"], 5);
        let images = page["images"].as_array().expect("images");
        sizes.push(images.len());
        for image in images {
            assert_eq!(image["status"], "completed", "{image}");
            assert!(image["results"].is_object(), "{image}");
            ids.push(image["id"].as_str().expect("id").to_owned());
        }
        let Some(cursor) = page["nextCursor"].as_str() else {
            assert_eq!(page["links"]["next"], Value::Null);
            break;
        };
        // Every other page by the link the answer gives.
        path = if by_link {
            page["links"]["next"]
                .as_str()
                .expect("next link")
                .to_owned()
        } else {
            format!("/v1/image-groups/{group}?limit=2&cursor={cursor}")
        };
        by_link = !by_link;
    }
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(ids, ["i0", "i1", "i2", "i3", "i4"]);

    // What the API did not hand out for this group is refused (a cursor names a position
    // and the image there), as is a bad limit or filter.
    for query in [
        "limit=0",
        "limit=1001",
        "cursor=garbage",
        "cursor=99.i99",
        "cursor=1.i0",
        "state=failed",
    ] {
        let (status, problem) = h.get(&format!("/v1/image-groups/{group}?{query}")).await;
        assert_eq!(status, 400, "{query}: {problem}");
        assert_eq!(problem["code"], "invalid_parameter", "{query}: {problem}");
    }
}
