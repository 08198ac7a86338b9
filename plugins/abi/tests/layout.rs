//! The frozen 1.0 layouts: a plugin or host built today must read the same bytes as
//! one built against 1.0, whatever later minors append. If a test here fails, a 1.0
//! field moved or changed size, or the 1.0 size grew: that breaks every built plugin.

use core::mem::{offset_of, size_of};

use reel_plugin_abi::{
    AbiVersion, ExecFn, HOST_CALLBACKS_V1_0_SIZE, HOST_CALLBACKS_V1_1_SIZE, HostCallbacks, OpFn,
    RunnerVTable, VTABLE_V1_0_SIZE, VTABLE_V1_2_SIZE, field_present,
};

/// One machine word: `usize`, pointers and function pointers.
const W: usize = size_of::<usize>();

#[test]
fn the_1_0_sizes_are_literals() {
    assert_eq!(VTABLE_V1_0_SIZE, 8 + 18 * W);
    assert_eq!(HOST_CALLBACKS_V1_0_SIZE, 5 * W);
    #[cfg(target_pointer_width = "64")]
    assert_eq!((VTABLE_V1_0_SIZE, HOST_CALLBACKS_V1_0_SIZE), (152, 40));
}

#[test]
fn runner_vtable_1_0_fields_keep_their_offsets() {
    let words = |n: usize| 8 + n * W;
    let fields = [
        ("abi_version", offset_of!(RunnerVTable, abi_version), 0),
        ("struct_size", offset_of!(RunnerVTable, struct_size), 8),
        ("init", offset_of!(RunnerVTable, init), words(1)),
        (
            "free_buffer",
            offset_of!(RunnerVTable, free_buffer),
            words(2),
        ),
        ("create", offset_of!(RunnerVTable, create), words(3)),
        ("destroy", offset_of!(RunnerVTable, destroy), words(4)),
        ("describe", offset_of!(RunnerVTable, describe), words(5)),
        ("validate", offset_of!(RunnerVTable, validate), words(6)),
        ("plan", offset_of!(RunnerVTable, plan), words(7)),
        ("prepare", offset_of!(RunnerVTable, prepare), words(8)),
        ("boot", offset_of!(RunnerVTable, boot), words(9)),
        ("connect", offset_of!(RunnerVTable, connect), words(10)),
        ("exec", offset_of!(RunnerVTable, exec), words(11)),
        ("cancel", offset_of!(RunnerVTable, cancel), words(12)),
        ("drain", offset_of!(RunnerVTable, drain), words(13)),
        ("poweroff", offset_of!(RunnerVTable, poweroff), words(14)),
        ("cleanup", offset_of!(RunnerVTable, cleanup), words(15)),
        ("probe", offset_of!(RunnerVTable, probe), words(16)),
        ("reattach", offset_of!(RunnerVTable, reattach), words(17)),
    ];
    for (name, offset, frozen) in fields {
        assert_eq!(offset, frozen, "RunnerVTable::{name} moved");
    }
    assert_eq!(size_of::<AbiVersion>(), 8);
    assert_eq!((size_of::<OpFn>(), size_of::<ExecFn>()), (W, W));
    // The last 1.0 field ends at the 1.0 size, and the table never shrinks below it.
    assert_eq!(offset_of!(RunnerVTable, reattach) + W, VTABLE_V1_0_SIZE);
    assert!(size_of::<RunnerVTable>() >= VTABLE_V1_0_SIZE);
}

#[test]
fn host_callbacks_1_0_fields_keep_their_offsets() {
    let fields = [
        ("struct_size", offset_of!(HostCallbacks, struct_size), 0),
        ("ctx", offset_of!(HostCallbacks, ctx), W),
        ("event", offset_of!(HostCallbacks, event), 2 * W),
        ("log", offset_of!(HostCallbacks, log), 3 * W),
        ("max_level", offset_of!(HostCallbacks, max_level), 4 * W),
    ];
    for (name, offset, frozen) in fields {
        assert_eq!(offset, frozen, "HostCallbacks::{name} moved");
    }
    // `max_level` is a u32 padded to a word: the 1.0 size includes the padding, so
    // a field appended in 1.1 starts at or after it.
    assert!(offset_of!(HostCallbacks, max_level) + size_of::<u32>() <= HOST_CALLBACKS_V1_0_SIZE);
    assert!(size_of::<HostCallbacks>() >= HOST_CALLBACKS_V1_0_SIZE);
}

#[test]
fn host_callbacks_1_1_appends_output_stored_after_the_1_0_layout() {
    // Starts at (not inside the padding of) the 1.0 size: a 1.0 host's
    // struct_size never seems to cover it.
    assert_eq!(
        offset_of!(HostCallbacks, output_stored),
        HOST_CALLBACKS_V1_0_SIZE
    );
    assert_eq!(HOST_CALLBACKS_V1_1_SIZE, 6 * W);
    assert_eq!(size_of::<HostCallbacks>(), HOST_CALLBACKS_V1_1_SIZE);
    let end = offset_of!(HostCallbacks, output_stored) + W;
    assert!(!field_present(HOST_CALLBACKS_V1_0_SIZE, end));
    assert!(field_present(HOST_CALLBACKS_V1_1_SIZE, end));
}

#[test]
fn runner_vtable_1_2_appends_collect_after_the_1_0_layout() {
    // 1.1 changed only the host's callbacks: a 1.1 plugin's table is 1.0-sized,
    // and `collect` starts right where it ends.
    assert_eq!(offset_of!(RunnerVTable, collect), VTABLE_V1_0_SIZE);
    assert_eq!(VTABLE_V1_2_SIZE, VTABLE_V1_0_SIZE + W);
    assert_eq!(size_of::<RunnerVTable>(), VTABLE_V1_2_SIZE);
    let end = offset_of!(RunnerVTable, collect) + size_of::<OpFn>();
    assert!(!field_present(VTABLE_V1_0_SIZE, end));
    assert!(field_present(VTABLE_V1_2_SIZE, end));
}

#[test]
fn a_field_is_present_only_if_struct_size_covers_its_end() {
    let reattach_end = offset_of!(RunnerVTable, reattach) + size_of::<OpFn>();
    // A 1.0 plugin's table has every 1.0 field ...
    assert!(field_present(VTABLE_V1_0_SIZE, reattach_end));
    // ... but not a field a 1.1 host would append right after them.
    assert!(!field_present(VTABLE_V1_0_SIZE, VTABLE_V1_0_SIZE + W));
    // A table from a newer minor has both.
    assert!(field_present(VTABLE_V1_0_SIZE + W, VTABLE_V1_0_SIZE + W));
    // A field cut short is absent.
    assert!(!field_present(reattach_end - 1, reattach_end));
    let max_level_end = offset_of!(HostCallbacks, max_level) + size_of::<u32>();
    assert!(field_present(HOST_CALLBACKS_V1_0_SIZE, max_level_end));
    assert!(!field_present(max_level_end - 1, max_level_end));
}
