// The one piece of dlib sd2 uses (feature `dlib`): its 68-point shape predictor, behind a C
// interface that never lets a C++ exception cross into Rust. Built by build.rs against the
// system's dlib (Debian: libdlib-dev; the model file comes with libdlib-data).
#include <dlib/array2d.h>
#include <dlib/image_processing/shape_predictor.h>
#include <dlib/pixel.h>
#include <dlib/serialize.h>

#include <cstring>
#include <exception>
#include <string>

namespace {
void set_error(char* err, size_t len, const char* what) {
    if (err == nullptr || len == 0) return;
    std::strncpy(err, what, len - 1);
    err[len - 1] = '\0';
}
}  // namespace

extern "C" {

// A shape predictor read from `path`, or null with the reason in `err`.
void* sd2_dlib_load(const char* path, char* err, size_t err_len) {
    try {
        auto* sp = new dlib::shape_predictor();
        try {
            dlib::deserialize(path) >> *sp;
        } catch (...) {
            delete sp;
            throw;
        }
        if (sp->num_parts() != 68) {
            std::string m = "the model has " + std::to_string(sp->num_parts()) +
                            " landmarks, not dlib's 68";
            delete sp;
            set_error(err, err_len, m.c_str());
            return nullptr;
        }
        return sp;
    } catch (const std::exception& e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown error");
    }
    return nullptr;
}

void sd2_dlib_free(void* sp) { delete static_cast<dlib::shape_predictor*>(sp); }

// The 68 landmarks (x, y pairs into `out`) of the face in box [x0, y0, x1, y1] of an RGB image
// (`w` × `h`, rows of 3·w bytes). 0 on success; otherwise the reason is in `err`.
int sd2_dlib_landmarks(const void* sp, const unsigned char* rgb, long w, long h, long x0, long y0,
                       long x1, long y1, float* out, char* err, size_t err_len) {
    try {
        dlib::array2d<dlib::rgb_pixel> img(h, w);
        for (long y = 0; y < h; ++y) {
            const unsigned char* row = rgb + 3 * w * y;
            for (long x = 0; x < w; ++x) {
                img[y][x] = dlib::rgb_pixel(row[3 * x], row[3 * x + 1], row[3 * x + 2]);
            }
        }
        const auto* pred = static_cast<const dlib::shape_predictor*>(sp);
        dlib::full_object_detection shape = (*pred)(img, dlib::rectangle(x0, y0, x1, y1));
        if (shape.num_parts() != 68) {
            set_error(err, err_len, "the predictor did not give 68 landmarks");
            return 1;
        }
        for (unsigned long i = 0; i < 68; ++i) {
            out[2 * i] = static_cast<float>(shape.part(i).x());
            out[2 * i + 1] = static_cast<float>(shape.part(i).y());
        }
        return 0;
    } catch (const std::exception& e) {
        set_error(err, err_len, e.what());
    } catch (...) {
        set_error(err, err_len, "unknown error");
    }
    return 1;
}
}
